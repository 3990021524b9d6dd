"""Crash attribution of the shared launches, without launching: a layout that raises inside
``layout_scope`` is named, dropped and the launch rerun, and its own test fails on it."""

from __future__ import annotations

import traceback

import pytest

import harness


def _rank_traceback(name: str) -> str:
    try:
        with harness.layout_scope(name):
            raise RuntimeError("shapes do not match")
    except harness.LayoutCrashed:
        return traceback.format_exc()


def test_a_crashed_layout_is_dropped_and_reported_on_its_own(monkeypatch):
    calls = []

    def fake_launch(target, world_size, timeout, **kwargs):
        calls.append(kwargs)
        names = [spec["name"] for spec in kwargs["layouts"]] + list(kwargs["trainers"])
        for bad in ("b", "t2"):
            if bad in names:
                raise harness.RankFailure(f"rank 1 raised:\n{_rank_traceback(bad)}")
        return [{"ran": names}]

    monkeypatch.setattr(harness, "launch", fake_launch)
    layouts = [dict(name="a"), dict(name="b"), dict(name="c")]
    results, crashes = harness.launch_layouts("m:f", 2, layouts=layouts, trainers={"t1": [], "t2": []}, other=1)
    assert results == [{"ran": ["a", "c", "t1"]}]
    assert sorted(crashes) == ["b", "t2"] and "shapes do not match" in crashes["b"]
    assert all(call["other"] == 1 for call in calls) and len(calls) == 3
    harness.check_no_crash(crashes, "a")
    with pytest.raises(harness.LayoutCrashed, match="layout 'b' crashed"):
        harness.check_no_crash(crashes, "b")


def test_a_crash_outside_any_layout_fails_the_launch(monkeypatch):
    def fake_launch(target, world_size, timeout, **kwargs):
        raise harness.RankFailure("rank 0 raised:\nRuntimeError: boom")

    monkeypatch.setattr(harness, "launch", fake_launch)
    with pytest.raises(harness.RankFailure, match="boom"):
        harness.launch_layouts("m:f", 2, layouts=[dict(name="a")])
