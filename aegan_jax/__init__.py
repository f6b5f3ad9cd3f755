"""AE-GAN (Cao et al., IJCV 2023) in JAX/Flax."""
import os as _os

# XLA:CPU's YNNPACK fusions run this model's convolutions (weight gradients above all) about
# 3x slower than its Eigen path: 2-core CPU, 256 px, ngf 64, one iteration 17.7 s -> 6 s
# (benchmarks/train_step.py).  Only CPU compilation reads the flag.  Set before jax starts;
# a value the user gives wins.
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type='
if 'xla_cpu_experimental_ynn_fusion_type' not in _os.environ.get('XLA_FLAGS', ''):
  _os.environ['XLA_FLAGS'] = (_os.environ.get('XLA_FLAGS', '') + ' ' + _YNN_FLAG).strip()
