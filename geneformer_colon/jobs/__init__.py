"""What a command does, one module a job: train, pretrain, evaluate, CV, sweeps, baselines, predict, embed,
export, perturb, explain."""
