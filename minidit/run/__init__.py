"""The run layer: turning concepts into trained models and samples.

    config      TrainConfig and the named presets (plain data, stored in checkpoints)
    objectives  the diffusion objectives: their losses and the samplers their network drives
    latent      latent diffusion and the autoencoder objective
    checkpoint  the checkpoint file: atomic writes, every random state, exact resume
    weights     the weights that ship inside the package: files, SHA-256, the runs that made them
    build       model, objective and data from a config; a trained run from its checkpoint
    runfolder   a run folder belongs to one run: refuse, resume or restart; an OS lock
    budget      steps and/or minutes, and the learning rate and EMA that follow the budget
    guard       divergence (skip non-finite updates, stop a diverged run) and SIGINT/SIGTERM
    engine      the training loop (AdamW, EMA, bf16, DDP)
    generate    drawing and scoring samples of a trained run
    outputs     writing sample files safely
    report      train, then sample and score: the README's main job
    pretrained  the shipped models, loaded ready to sample

It imports the concept modules of `minidit` and nothing of `minidit.cli`.
"""
