"""``Router.from_config``: a Portkey-style config of targets, built into members; a wrong key is refused
with its path; keys never reach repr, saved state or pickles."""

from __future__ import annotations

import pickle

import pytest

from dspy_anyscale import ConfigurationError, Router

from ..conftest import MODEL, SECRET


def _target(server, **extra):
    return {
        "provider": "openai",
        "custom_host": server.base_url,
        "api_key": SECRET,
        "override_params": {"model": MODEL},
        **extra,
    }


def test_a_loadbalance_config_splits_by_weight(stubs):
    a, b = stubs(), stubs()
    config = {
        "strategy": {"mode": "loadbalance"},
        "targets": [_target(a, weight=0.75, name="a"), _target(b, weight=0.25, name="b")],
    }
    lm = Router.from_config(config, use_chat_api=True, cache=False)
    try:
        assert lm.strategy == "weighted" and lm.dump_state()["weights"] == {"a": 0.75, "b": 0.25}
        for i in range(200):
            lm(f"q{i}")
        assert 0.6 <= len(a.posts()) / 200 <= 0.9 and len(a.posts()) + len(b.posts()) == 200
    finally:
        lm.close()


def test_a_fallback_config_with_status_codes_nested_groups_and_override_params(stubs, closed_port):
    a, b, c = stubs(), stubs(), stubs()
    config = {
        "strategy": {"mode": "fallback", "on_status_codes": [429, 503]},
        "override_params": {"max_tokens": 64},
        "targets": [
            {"custom_host": closed_port, "api_key": SECRET, "override_params": {"model": MODEL}},
            {
                "name": "pool",
                "strategy": {"mode": "loadbalance"},
                "retry": {"attempts": 1},
                "targets": [
                    _target(b, override_params={"model": MODEL, "temperature": 0.7}),
                    _target(c, weight=0),
                ],
            },
            _target(a, request_timeout=30000),
        ],
    }
    lm = Router.from_config(config, use_chat_api=True, cache=False)
    try:
        names = list(lm.members)
        assert names == [
            f"{MODEL}@{closed_port.removeprefix('http://').removesuffix('/v1')}",
            "pool",
            f"{MODEL}@127.0.0.1:{a.port}",
        ]
        pool = lm.members["pool"]
        assert isinstance(pool, Router) and pool.strategy == "weighted"
        first = next(iter(pool.members.values()))
        assert (first.kwargs["temperature"], first.kwargs["max_tokens"], first.num_retries) == (0.7, 64, 1)
        assert lm.members[names[2]].timeout.read == 30.0
        assert lm("q") == ["echo: q"] and len(b.posts()) == 1 and not c.posts()
        assert lm.dump_state()["fallback_on"] == [429, 503]
    finally:
        lm.close()


def test_keys_from_the_config_never_reach_repr_saved_state_or_pickles(stubs, monkeypatch):
    a = stubs()
    lm = Router.from_config({"targets": [_target(a)]}, use_chat_api=True)
    try:
        assert lm("q") == ["echo: q"]
        assert SECRET not in repr(lm) and SECRET not in repr(lm.dump_state())
        assert SECRET.encode() not in pickle.dumps(lm)
    finally:
        lm.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], "config must be a dict"),
        ({"targets": []}, "config.targets must be a non-empty list"),
        (
            {"strategy": {"mode": "conditional"}, "targets": [{}]},
            r"config.strategy.mode must be .* \(conditional routing",
        ),
        ({"strategy": {"mode": "fallback", "retries": 2}, "targets": [{}]}, "config.strategy.retries: unknown key"),
        ({"strategy": {"mode": "fallback", "on_status_codes": [600]}, "targets": [{}]}, r"on_status_codes\[0\]"),
        ({"targets": [{"override_params": {}}]}, r"config.targets\[0\].override_params.model must name the model"),
        (
            {"targets": [{"override_params": {"model": "m", "temprature": 0.2}}]},
            r"config.targets\[0\].override_params.temprature: not a generation parameter",
        ),
        (
            {"targets": [{"virtual_key": "vk", "override_params": {"model": "m"}}]},
            r"targets\[0\].virtual_key: a virtual key",
        ),
        ({"cache": {"mode": "simple"}, "targets": [{}]}, "config.cache: DSPy caches answers itself"),
        ({"targets": [{"provider": "anthropic", "override_params": {"model": "m"}}]}, r"targets\[0\].provider must be"),
        ({"targets": [{"custom_host": 17, "override_params": {"model": "m"}}]}, r"targets\[0\].custom_host must be"),
        ({"targets": [{"weight": -1, "override_params": {"model": "m"}}]}, r"targets\[0\].weight must be"),
        (
            {"targets": [{"retry": {"attempts": 2, "on_status_codes": [500]}, "override_params": {"model": "m"}}]},
            "retry must be",
        ),
        ({"targets": [{"request_timeout": 0, "override_params": {"model": "m"}}]}, "request_timeout must be"),
        (
            {"targets": [{"targets": [{"override_params": {"model": "m"}, "bogus": 1}]}]},
            r"targets\[0\].targets\[0\].bogus",
        ),
        (
            {"targets": [{"custom_host": "ftp://x/v1", "api_key": "k", "override_params": {"model": "m"}}]},
            r"config.targets\[0\]: api_base",
        ),
    ],
)
def test_a_wrong_config_is_refused_with_the_path_of_what_is_wrong(config, message):
    with pytest.raises(ConfigurationError, match=message):
        Router.from_config(config)
