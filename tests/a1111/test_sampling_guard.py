"""``guard_sampling``: a pass patches when its sampling starts and ends when it ends, normally or by
an exception."""

from __future__ import annotations

import pytest

from pladis.hosts.a1111 import guard_sampling


class _Sampler:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error, self.launched = error, 0

    def launch_sampling(self, steps: int, func):
        self.launched += 1
        if self.error is not None:
            raise self.error
        return func()


def test_begins_before_and_ends_after_a_normal_pass_with_the_pass_result() -> None:
    events: list[str] = []
    sampler = _Sampler()
    assert guard_sampling(sampler, lambda: events.append("begin"), lambda: events.append("end"))
    assert events == []  # nothing happens before sampling starts
    assert sampler.launch_sampling(3, lambda: events.append("sample") or "latent") == "latent"
    assert events == ["begin", "sample", "end"] and sampler.launched == 1


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_ends_when_the_pass_raises_and_lets_the_error_through(error: BaseException) -> None:
    events: list[str] = []
    sampler = _Sampler(error)
    guard_sampling(sampler, lambda: events.append("begin"), lambda: events.append("end"))
    with pytest.raises(type(error)):
        sampler.launch_sampling(3, lambda: None)
    assert events == ["begin", "end"]


def test_ends_when_begin_raises() -> None:
    events: list[str] = []
    sampler = _Sampler()
    guard_sampling(sampler, lambda: 1 / 0, lambda: events.append("end"))
    with pytest.raises(ZeroDivisionError):
        sampler.launch_sampling(3, lambda: events.append("sample"))
    assert events == ["end"] and sampler.launched == 0


def test_a_sampler_is_wrapped_once_and_others_are_left_alone() -> None:
    events: list[int] = []
    sampler = _Sampler()
    assert guard_sampling(sampler, lambda: events.append(0), lambda: events.append(1))
    assert guard_sampling(sampler, lambda: events.append(2), lambda: events.append(3))  # guarded already
    sampler.launch_sampling(1, lambda: None)
    assert events == [0, 1]  # no stacking
    assert not _Sampler().__dict__.get("launch_sampling")  # other sampler objects are untouched
    assert not guard_sampling(None, lambda: None, lambda: None)
    assert not guard_sampling(object(), lambda: None, lambda: None)
