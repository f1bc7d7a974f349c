"""Measurement: our engine beside the reference users would pick, on a shared, noisy machine.

One idea a module: ``idle`` (wait for a quiet machine, report interference),
``rows`` (a measured figure), ``machine`` (the CPU, its cache and DRAM
bandwidth: the physical limit), ``kernels`` (numba bandwidth kernels),
``models`` (random-weight and HF builders), ``engines`` (decode and prefill of
ours and of HF + torch), ``subprocess_engine`` / ``worker`` (an engine in its
own process), ``ops`` (GEMV/GEMM shapes), ``profile`` (time per op through
``OpTable.instrumented``), ``batch`` (batched decode), ``tokenizer``.

Floors: ``cli -> bench -> api``; nothing here imports ``opswitch.cli``
(``cli/bench_cmd.py`` parses the flags and prints the tables).
"""
