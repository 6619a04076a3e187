"""The HTCondor backend's pure parts (quoting, owner policy, security), checked with Condor's own parsers."""

from __future__ import annotations

from pathlib import Path

import pytest

cfg = pytest.importorskip("bonjourgrid_condor.config", reason="the condor backend is not installed")
htcondor2 = pytest.importorskip("htcondor2")
classad2 = pytest.importorskip("classad2")


def test_arguments_and_environment_survive_condor_quoting():
    argv = ["python3", "-c", "print('it''s \"quoted\"')", "two words", ""]
    sub = htcondor2.Submit({"executable": "/usr/bin/env", "arguments": cfg.quote_args(argv),
                            "environment": cfg.quote_env({"A": "x y", "B": "it's"})})
    text = str(sub)
    assert "arguments" in text and "environment" in text
    assert cfg.quote_args(["a b", "c"]) == "\"'a b' 'c'\""
    assert cfg.quote_args(["it's"]) == "\"'it''s'\""
    assert cfg.quote_env({"K": 'say "hi"'}) == "\"K='say \"\"hi\"\"'\""
    with pytest.raises(ValueError):
        cfg.quote_env({"BAD NAME": "x"})


def _policy() -> dict[str, str]:
    out = {}
    for line in cfg.POLICY.splitlines():
        name, _, value = line.partition("=")
        out[name.strip()] = value.strip()
    return out


@pytest.mark.parametrize(("busy", "start", "suspend"), [(False, True, False), (True, False, True)])
def test_owner_policy_maps_onto_start_and_suspend(busy, start, suspend):
    p = _policy()
    ad = classad2.ClassAd({"BgOwnerBusy": busy, "Activity": "Busy"})
    assert classad2.ExprTree(p["START"]).eval(ad) is start
    assert classad2.ExprTree(p["SUSPEND"]).eval(ad) is suspend
    assert classad2.ExprTree(p["CONTINUE"]).eval(ad) is (not busy)


def test_a_startd_without_the_owner_attribute_still_starts_jobs():
    assert classad2.ExprTree(_policy()["START"]).eval(classad2.ClassAd()) is True


def test_pool_configs_are_closed_to_anyone_without_the_key(tmp_path: Path):
    text = cfg.worker_config(tmp_path, "10.0.0.1:9618", "10.0.0.2", 9618, tmp_path / "pw", cpus=2, memory_mib=512,
                             node_id="n1")
    assert "HOST_BASED" not in text and "CLAIMTOBE" not in text
    assert "SEC_DEFAULT_AUTHENTICATION = REQUIRED" in text
    for line in text.splitlines():
        if line.startswith("ALLOW_"):
            assert "*" not in line.split("=", 1)[1].replace("condor_pool@*", ""), line
