"""Training: the accelerate loop, the denoising loss, optimizers and schedules."""
