"""Every preset compiles and fits on the topology its header names, with the defaults.

`metatrain compile` for each (preset, topology) pair the README's table lists; minutes
of compiling on 2 cores, so `-m slow`.
"""

from __future__ import annotations

import re

import pytest

from metatrain.cli import main
from metatrain.io.paths import CONFIGS_DIR, REPO_ROOT

#: preset -> (topology, GiB a chip it was measured at)
FITS = {
    "tiny": ("v5e:1x1", 0.022),
    "default": ("v5e:1x1", 0.24),
    "125m": ("v5e:4x4", 6.2),
    "1b": ("v5p:2x2x2", 61.9),
    "7b": ("v5p:4x4x4", 9.6),
}


def test_the_table_and_the_headers_name_these_topologies():
    readme = (REPO_ROOT / "README.md").read_text()
    for preset, (topology, gib) in FITS.items():
        header = (CONFIGS_DIR / f"{preset}.yaml").read_text()
        assert f"Fits with the defaults on {topology}" in header, preset
        assert re.search(rf"\| `{preset}` \| `{re.escape(topology)}` \|", readme), preset


@pytest.mark.slow
@pytest.mark.tpu
@pytest.mark.parametrize("preset", sorted(FITS))
def test_the_preset_fits_its_topology_with_the_defaults(preset, capsys):
    pytest.importorskip("libtpu")
    topology, measured = FITS[preset]
    assert main(["compile", "--config", str(CONFIGS_DIR / f"{preset}.yaml"), "--topology", topology]) == 0, (
        capsys.readouterr().err
    )
    out = capsys.readouterr().out
    assert out.rstrip().endswith("fits: yes")
    total = float(re.search(r"total\s+([\d.]+) GiB", out).group(1))
    assert total <= measured * 1.1 + 0.01, f"{preset} on {topology}: {total} GiB a chip, was {measured}"
