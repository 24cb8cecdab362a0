"""tegrastats parser on REAL tegrastats lines (tests/data/tegrastats_real.txt cites each source)."""

from __future__ import annotations

import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks.board.tegrastats import TegrastatsSampler, parse_line, parse_lines, summarize

DATA = Path(__file__).parent / "data" / "tegrastats_real.txt"


def sections() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur = None
    for line in DATA.read_text().splitlines():
        if line.startswith("#@"):
            cur = line[2:].strip()
            out[cur] = []
        elif line.startswith("#") or not line.strip():
            continue
        else:
            assert cur is not None
            out[cur].append(line)
    return out


def test_fixture_cites_its_sources():
    text = DATA.read_text()
    for src in ("Abdel-E/tegrastats_parser", "waggle-sensor/jetson-exporter", "ssaraff98/tegrastats_parser",
                "FindHao/tx-utils"):
        assert src in text


def test_agx_orin_jetpack6_line():
    line = sections()["agx-orin"][0]
    s = parse_line(line)
    assert s.timestamp == "10-26-2025 05:10:54"
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb) == (6879, 62841, 0)
    assert len(s.cpu_load_pct) == 12 and s.cpu_load_pct[:4] == [5, 1, 0, 9] and set(s.cpu_freq_mhz) == {729}
    assert s.gpu_load_pct == 0 and s.gpu_freq_mhz == [305, 305]
    assert (s.emc_load_pct, s.emc_freq_mhz) == (0, 2133)
    assert s.temps_c["tj"] == pytest.approx(47.687) and s.temps_c["gpu"] == pytest.approx(43.218)
    assert s.rails_mw == {"VDD_GPU_SOC": 2801, "VDD_CPU_CV": 400, "VIN_SYS_5V0": 4536, "VDDQ_VDD2_1V8AO": 604}
    # no input rail on the AGX Orin: the total is the sum of its rails, and says so
    total, src = s.total_power_mw()
    assert total == 2801 + 400 + 4536 + 604
    assert src.startswith("sum(") and "VIN_SYS_5V0" in src
    # a chosen subset of rails (e.g. compute only)
    assert s.total_power_mw(["VDD_GPU_SOC", "VDD_CPU_CV"]) == (3201, "VDD_GPU_SOC+VDD_CPU_CV")


def test_running_average_is_kept_apart_from_current():
    s = parse_line(sections()["agx-orin"][2])
    assert s.rails_mw["VDD_GPU_SOC"] == 3201 and s.rails_avg_mw["VDD_GPU_SOC"] == 2934
    assert s.gpu_load_pct == 40


def test_input_rail_is_the_total_never_summed_with_subrails():
    sec = sections()
    nx411 = parse_line(sec["xavier-nx-jp411"][0])
    assert nx411.rails_mw == {"VDD_IN": 6140, "VDD_CPU_GPU_CV": 2706, "VDD_SOC": 1074}
    assert nx411.total_power_mw() == (6140, "VDD_IN")
    nx512 = parse_line(sec["xavier-nx-jp512"][0])
    assert nx512.timestamp == "07-09-2024 13:31:31" and nx512.gpu_freq_mhz == [114]
    assert nx512.total_power_mw() == (2763, "VDD_IN")
    nano = parse_line(sec["nano-jp461"][0])
    assert nano.total_power_mw() == (1750, "POM_5V_IN")
    assert nano.rails_mw["POM_5V_CPU"] == 366
    assert "IRAM" not in nano.rails_mw and "RAM" not in nano.rails_mw


def test_older_boards_cores_off_and_non_tegrastats_lines():
    lines = sections()["tx2-log"]
    samples = parse_lines(lines)
    assert len(samples) == len(lines) - 1  # the `date` line is skipped
    tx2 = samples[0]
    assert tx2.total_power_mw() == (1649, "VDD_IN") and tx2.rails_mw["VDD_SYS_DDR"] == 173
    off = samples[2]
    assert off.cpu_load_pct == [2, None, None, None, None, None]
    xavier = samples[3]  # AGX Xavier: rails without VDD_ prefix, no input rail
    assert xavier.rails_mw == {"GPU": 0, "CPU": 216, "SOC": 864, "CV": 0, "VDDRQ": 144, "SYS5V": 1889}
    assert xavier.total_power_mw()[0] == 216 + 864 + 144 + 1889
    issue = parse_line(sections()["tx2-issue"][0])
    assert issue.total_power_mw() == (3140, "VDD_IN") and issue.rails_avg_mw["VDD_IN"] == 3208


def test_summary_energy_per_inference():
    samples = parse_lines(sections()["agx-orin"])
    totals = [s.total_power_mw()[0] for s in samples]
    res = summarize(samples, duration_s=2.0, inferences=400)
    assert res["power_samples"] == 6
    assert res["mean_power_mw"] == pytest.approx(sum(totals) / 6)
    assert res["peak_power_mw"] == max(totals)
    assert res["energy_mj"] == pytest.approx(sum(totals) / 6 * 2.0 / 400)  # mW * s / n = mJ
    assert res["temp_max_c"]["tj"] == pytest.approx(48.812)
    assert res["board_ram_used_max_mb"] == 7026
    assert summarize([], duration_s=1, inferences=1)["error"]


def test_sampler_absent_tool_is_reported_not_raised():
    s = TegrastatsSampler(command="tegrastats-does-not-exist-here")
    assert not s.available and "not found" in s.error
    with s:
        pass
    assert s.samples == []


def test_sampler_reads_a_replayed_real_log(tmp_path: Path):
    """No Jetson here: a stand-in `tegrastats` executable replays the real AGX Orin lines at the
    requested interval, exercising the subprocess, the reader thread and the time window."""
    log = tmp_path / "orin.txt"
    log.write_text("\n".join(sections()["agx-orin"]) + "\n")
    exe = tmp_path / "tegrastats"
    exe.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys, time
        ms = int(sys.argv[sys.argv.index("--interval") + 1])
        lines = open({str(log)!r}).read().splitlines()
        for i in range(200):
            print(lines[i % len(lines)], flush=True)
            time.sleep(ms / 1000)
        """))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    with TegrastatsSampler(interval_ms=20, command=str(exe)) as s:
        assert s.available
        time.sleep(0.3)
        t0 = time.monotonic()
        time.sleep(0.3)
        t1 = time.monotonic()
    window = s.samples_between(t0, t1)
    assert len(s.samples) >= len(window) >= 3
    assert all(w.rails_mw["VDD_GPU_SOC"] >= 2801 for w in window)
    res = summarize(window, duration_s=t1 - t0, inferences=10)
    assert 8000 < res["mean_power_mw"] < 13000 and res["energy_mj"] > 0


# ------------------------------------------------------------------ Jetson memory: RAM + nvmap
def test_nvmap_client_table(tmp_path):
    from benchmarks.board.tegrastats import nvmap_client_mb

    t = tmp_path / "clients"
    t.write_text("CLIENT                        PROCESS      PID        SIZE\n"
                 "user                          python3     4242      204800K\n"
                 "user                          python3     4242       10240K\n"
                 "user                     gnome-shell      900      51200K\n"
                 "total                                             266240K\n")
    assert nvmap_client_mb(4242, str(t)) == 210.0
    assert nvmap_client_mb(1, str(t)) == 0.0
    assert nvmap_client_mb(4242, str(tmp_path / "missing")) is None  # debugfs not readable: unknown


def test_jetson_peak_memory_adds_gpu_memory():
    from benchmarks.board.tegrastats import jetson_peak_memory, parse_line

    # board RAM 3000 MB before the model loaded, 3900 MB at the peak; the process RSS grew 300 MB:
    # the other 600 MB are GPU (nvmap) buffers, which the RSS never shows
    lines = ["RAM 3000/7620MB (lfb 4x4MB) SWAP 0/3810MB CPU [5%@1510] GR3D_FREQ 0% VDD_IN 4000mW/4000mW",
             "RAM 3900/7620MB (lfb 4x4MB) SWAP 0/3810MB CPU [50%@1510] GR3D_FREQ 99% VDD_IN 9000mW/6500mW",
             "RAM 3850/7620MB (lfb 4x4MB) SWAP 0/3810MB CPU [50%@1510] GR3D_FREQ 99% VDD_IN 9000mW/7000mW"]
    samples = [parse_line(l) for l in lines]
    jm = jetson_peak_memory(400.0, 100.0, 3000, samples)
    assert jm["board_ram_added_mb"] == 900 and jm["nvmap_mb"] == 600.0 and jm["peak_memory_mb"] == 1000.0
    # the nvmap client table, when readable, is used as is
    assert jetson_peak_memory(400.0, 100.0, 3000, samples, nvmap_mb=512.0)["peak_memory_mb"] == 912.0
    # nothing known about the GPU: the RSS alone, and the record says so
    jm = jetson_peak_memory(400.0, 100.0, None, [])
    assert jm["peak_memory_mb"] == 400.0 and "GPU memory not counted" in jm["source"]
