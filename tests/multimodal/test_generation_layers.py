"""multimodal.generation and multimodal.judges stand apart from the shapes-diffusion zoo package.

steering/ (interventions on diffusion text encoders) embeds prompts and
generates through multimodal.generation, and evals/ scores images with
multimodal.judges; neither should pull in the zoo model's training recipe. Each
check runs in a fresh interpreter, since this test process may have imported
the zoo already.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from multimodal import zoo

RECIPE = "multimodal.zoo.shapes_diffusion.recipe"


def _modules_after_import(module: str) -> set[str]:
    """The names in sys.modules of a fresh interpreter after ``import module``."""
    code = f"import json, sys\nimport {module}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["multimodal.generation", "multimodal.judges"])
def test_imports_without_the_shapes_diffusion_recipe(module):
    loaded = _modules_after_import(module)
    assert module in loaded
    assert RECIPE not in loaded
    assert not any(name.startswith("multimodal.zoo.shapes_diffusion") for name in loaded)
    assert not any(name.split(".")[0] in ("steering", "evals") for name in loaded)  # the layer below them


@pytest.mark.parametrize("name", ["shapes-diffusion", "shapes-llava"])
def test_the_registry_finds_the_zoo_subpackages(name):
    """pkgutil.iter_modules lists a subpackage too: the registered class is the package's own."""
    assert name in zoo.list_models()
    assert zoo.get_zoo_class(name).__module__ == f"multimodal.zoo.{name.replace('-', '_')}"
