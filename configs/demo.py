"""A small MAE on scikit-image's bundled photographs: runs anywhere in minutes, no download."""

from mae_jax.configuration import base_config


def get_config():
    config = base_config()
    config.dataset.source = "demo"
    config.input.num_threads = 4
    config.input.prefetch = 16
    # A CPU resizes cheaper on the host, and these photographs' crops mostly exceed the 128 px canvas anyway
    config.input.resize_on_device = False
    config.image_size = 64
    config.model.variant = "mu/8"
    config.model.decoder_width = 64
    config.model.decoder_depth = 2
    config.model.decoder_heads = 4
    config.batch_size = 64
    config.total_steps = 800
    config.warmup_steps = 80
    config.base_lr = 2e-3  # lr 5e-4: a model this small and a batch this size take a larger rate than the paper's
    config.log_every_steps = 50
    config.evals.reconstruction.every_steps = 200
    config.evals.reconstruction.num_images = 8
    config.checkpoint_every_steps = 400
    return config
