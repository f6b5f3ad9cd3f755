"""The import graph: inference (evaluation, synthesis) loads no training code."""
import subprocess
import sys
from tests_helpers import ROOT



def test_synthesis_and_evaluation_import_no_training_code():
  probe = ('import sys, aegan_jax.synthesize, aegan_jax.evaluate; '
           "print(' '.join(m for m in ('aegan_jax.train', 'aegan_jax.losses', 'optax') "
           'if m in sys.modules))')
  loaded = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()
  assert loaded == []
