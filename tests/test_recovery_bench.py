"""benchmarks/recovery.py bookkeeping: which SGLP variant a table row names, and the cache keys that
let an interrupted run (or a run made before an option existed) reuse finished rows."""

from types import SimpleNamespace

import pytest

from benchmarks import recovery as R


def _args(**kw):
    return SimpleNamespace(**{"protocol": "natural", "allocation": "auto", "grad_batches": 1, **kw})


def test_variants_name_protocol_and_allocation():
    assert R._variant("sglp", _args(), lm=False) == ("sglp", "natural", "proportional", {})
    assert R._variant("sglp", _args(), lm=True) == ("sglp", "natural", "redundancy", {"allocation": "redundancy"})
    assert R._variant("sglp-reference", _args(), lm=False)[:3] == ("sglp", "reference", "proportional")
    assert R._variant("sglp-proportional", _args(), lm=True) == ("sglp", "natural", "proportional", {})
    assert R._variant("block_influence", _args(allocation="redundancy"), lm=True) == \
        ("block_influence", "natural", "redundancy", {})  # baselines have no SGLP options in their key
    gb = R._variant("sglp", _args(grad_batches=4), lm=True)[3]
    assert gb == {"allocation": "redundancy", "grad_batches": 4} and R._suffix(gb) == "-redundancy-gb4"
    with pytest.raises(SystemExit, match="unknown SGLP variant"):
        R._variant("sglp-magic", _args(), lm=False)


def test_cached_rows_are_found_by_equal_settings_only(tmp_path):
    settings = {"model": "smollm2", "method": R._key_method("sglp-proportional"), "steps": 20}
    assert settings["method"] == "sglp"  # rows from before the allocation option stay valid
    R._save_row(str(tmp_path), settings, {"method": "sglp", "ppl": 83.15})
    assert R._cached_row(str(tmp_path), settings) == {"method": "sglp", "ppl": 83.15}
    assert R._cached_row(str(tmp_path), {**settings, "steps": 120}) is None
    assert R._cached_row(str(tmp_path), {**settings, "allocation": "redundancy"}) is None
