"""A whole training run, as train.py makes it: the setup every caller shares, the run, its summary.

    setup        the setup steps in order (freeze, place, precision and kernels, --fsdp's sharding, AdamW)
    run          read, load, set up, train_loop with the run's files, save; the run folder as a transaction
    summary      summary.json: counts, rates, memory, losses
    micro_batch  --micro-batch auto: the size that trains fastest, or that fits
    live_bytes   the bytes of live tensors, counted as CUDA's allocator counts them for max_memory_allocated
    estimate     a run's peak memory before the run: its setup and steps on fake tensors, counted

May import: the standard library, torch, tqdm; bitfit.errors, bitfit.config, bitfit.core, bitfit.data, bitfit.model,
bitfit.store, bitfit.parallel
"""
