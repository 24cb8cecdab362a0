"""The wheel carries the device profiles and run configs (issue 13, item 7): `sglp-edge bench
--device jetson-orin-nano` finds its profile from an installed wheel, outside the repository."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_devices_and_configs_and_they_work_outside_the_repo(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    wheel = next((tmp_path / "dist").glob("sglp_edge-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    for n in ("sglp_edge/assets/devices/jetson-orin-nano.yaml", "sglp_edge/assets/devices/local-cpu-ort.yaml",
              "sglp_edge/assets/configs/default.yaml", "sglp_edge/assets/resnet56_fmnist/model.safetensors"):
        assert n in names, n
    work = tmp_path / "elsewhere"  # not the repository: only the installed package is importable
    work.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = "import sglp_edge.profiles.load as p; print(p.__file__); print(p.load_profile('jetson-orin-nano').backend)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith(str(site)) and p.stdout.splitlines()[1] == "tensorrt"
    p = subprocess.run([sys.executable, "-m", "sglp_edge.cli", "bench", "--list-devices"], capture_output=True,
                       text=True, cwd=work, env={**env, "COLUMNS": "200"}, timeout=120)
    assert p.returncode == 0 and "jetson-orin-nano" in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "-c", "from sglp_edge.commands.run import _resolve_config; from pathlib import "
                        "Path; print(_resolve_config(Path('default')))"], capture_output=True, text=True, cwd=work,
                       env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().startswith(str(site)), p.stderr
