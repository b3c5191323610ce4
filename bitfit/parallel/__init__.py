"""Several processes: torchrun's ranks, each with the whole model, and --fsdp's, each with a shard of it.

    torchrun  joining the process group; TorchrunWorld, whose sums train_step calls
    fsdp      --fsdp: every parameter sharded over the ranks (FSDP2); ShardedWorld; saving gathered

Each gives the step a world with the methods of bitfit.core.world.World: the core never imports this.

May import: the standard library, torch; bitfit.errors, bitfit.config, bitfit.core, bitfit.data, bitfit.model,
bitfit.store
"""
