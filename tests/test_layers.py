"""The math layer never imports Lightning: a notebook user needs only torch."""

import subprocess
import sys


def test_math_modules_import_without_lightning():
    code = (
        "import sys\n"
        "import lightning_landscape.curvature, lightning_landscape.sharpness, lightning_landscape.gradients\n"
        "import lightning_landscape.landscape, lightning_landscape.stability, lightning_landscape.plotting\n"
        "import lightning_landscape.init, lightning_landscape.batch_size, lightning_landscape.report\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
