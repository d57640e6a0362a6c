"""What the README's main install (`pip install -e .`, no extras) must allow: `posttrain plan` of every
shipped recipe, at full and tiny scale. The extras' packages are hidden from the process (an import of
one fails as if it were not installed), so a plan that quietly needs one fails here. (A fresh virtualenv
made with the README's command is checked by hand before an issue is closed; this keeps it true.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from posttrain_cli.config.compose import RECIPES_DIR

# The optional extras' top-level modules (pyproject.toml: test, qlora, trackers, vllm, bench).
EXTRAS = ("trl", "bitsandbytes", "wandb", "mlflow", "trackio", "tensorboard", "vllm", "PIL", "pytest")
# sys.path's finder does not see them: importlib.util.find_spec says None, an import raises
# ModuleNotFoundError, as where they are not installed.
HIDE = f"""
import sys
from importlib.machinery import PathFinder
found = PathFinder.find_spec
def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in {EXTRAS!r} else found(name, path, target)
PathFinder.find_spec = classmethod(find_spec)
from posttrain_cli.cli import main
sys.argv = ["posttrain", *sys.argv[1:]]
main()
"""
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("scale", [[], ["scale=tiny"]], ids=["full", "tiny"])
def test_every_recipe_plans_with_the_main_install_alone(tmp_path, recipe, scale):
    r = subprocess.run([sys.executable, "-c", HIDE, "plan", f"recipe={recipe}", *scale], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "stage graph" in r.stdout
