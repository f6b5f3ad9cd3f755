"""AE-GAN (Cao et al., IJCV 2023) in JAX/Flax."""
