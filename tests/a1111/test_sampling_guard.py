"""``end_with_sampling``: the session ends when a sampling pass ends, normally or by an exception."""

from __future__ import annotations

import pytest

from pladis.hosts.a1111 import end_with_sampling


class _Sampler:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error, self.launched = error, 0

    def launch_sampling(self, steps: int, func):
        self.launched += 1
        if self.error is not None:
            raise self.error
        return func()


def test_ends_after_a_normal_pass_with_the_pass_result() -> None:
    ended: list[int] = []
    sampler = _Sampler()
    assert end_with_sampling(sampler, lambda: ended.append(1))
    assert sampler.launch_sampling(3, lambda: "latent") == "latent"
    assert ended == [1] and sampler.launched == 1


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_ends_when_the_pass_raises_and_lets_the_error_through(error: BaseException) -> None:
    ended: list[int] = []
    sampler = _Sampler(error)
    end_with_sampling(sampler, lambda: ended.append(1))
    with pytest.raises(type(error)):
        sampler.launch_sampling(3, lambda: None)
    assert ended == [1]


def test_a_sampler_is_wrapped_once_and_others_are_left_alone() -> None:
    ended: list[int] = []
    sampler = _Sampler()
    assert end_with_sampling(sampler, lambda: ended.append(1))
    assert not end_with_sampling(sampler, lambda: ended.append(2))  # a second hook call: no stacking
    sampler.launch_sampling(1, lambda: None)
    assert ended == [1]
    assert not _Sampler().__dict__.get("launch_sampling")  # other sampler objects are untouched
    assert not end_with_sampling(None, lambda: None)
    assert not end_with_sampling(object(), lambda: None)
