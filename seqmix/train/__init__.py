"""Training: config, data pipelines, optimizers, checkpoints, sharding and the train loop."""
