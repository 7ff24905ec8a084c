"""Configuration: env substitution, secrets, strictness and clear errors."""

from __future__ import annotations

import pytest

from daedalus.config import ConfigError, effective_config, load_config, parse_config
from tests.conftest import REPO


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["example.yaml", "simulator.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config(REPO / "config" / name, env={})
    assert config.coinbase.product_ids == ["BTC-USD", "ETH-USD"]


def test_defaults_without_a_file():
    config = parse_config({})
    assert config.ingestion.batch_size == 100 and config.ingestion.on_queue_full == "drop"
    assert config.coinbase.channels == ["ticker", "level2", "market_trades"]
    assert config.processed_dir == config.data_dir / "processed"


def test_env_substitution_and_masked_secrets(tmp_path):
    path = write(
        tmp_path,
        "data_dir: ${DATA:-/tmp/d}\ncoinbase:\n  api_key: ${KEY}\n  api_secret: s3cr3t\n  ws_url: ws://h:${PORT}/ws\n"
        "sync:\n  destination: s3://bucket/literal-$${NOT_A_VAR}\n",
    )
    config = load_config(path, env={"KEY": "k-123", "PORT": "9000"})
    assert str(config.data_dir) == "/tmp/d"
    assert config.coinbase.api_key.get_secret_value() == "k-123"
    assert config.coinbase.ws_url == "ws://h:9000/ws"
    assert config.sync.destination == "s3://bucket/literal-${NOT_A_VAR}"
    shown = str(effective_config(config)) + repr(config)
    assert "k-123" not in shown and "s3cr3t" not in shown


def test_missing_env_var_names_the_key(tmp_path):
    path = write(tmp_path, "coinbase:\n  api_key: ${NOPE}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert err.value.problems == ["coinbase.api_key: environment variable NOPE is not set (use ${NOPE:-default})"]


def test_every_problem_is_reported_with_its_key_path(tmp_path):
    path = write(
        tmp_path,
        "ingestion:\n  batch_size: 0\n  on_queue_full: explode\n  flush_intervall: 3\n"
        "coinbase:\n  channels: [level2, level3]\n  ws_url: http://x\nbogus: 1\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    problems = "\n".join(err.value.problems)
    assert "ingestion.batch_size: Input should be greater than 0 (got 0)" in problems
    assert "ingestion.on_queue_full: Input should be 'drop' or 'block'" in problems
    assert "ingestion.flush_intervall: unknown key" in problems
    assert "coinbase.channels.1: Input should be" in problems
    assert "bogus: unknown key" in problems
    assert str(path) in str(err.value)


def test_url_scheme_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="ws_url 'http://x' must start with ws:// or wss://"):
        load_config(write(tmp_path, "coinbase:\n  ws_url: http://x\n"), env={})


@pytest.mark.parametrize(
    ("product", "reason"),
    [
        ("../x", "contains a path separator"),
        ("..", "contains '..'"),
        ("a/b", "contains a path separator"),
        ("BTC\\USD", "contains a path separator"),
        ("BTC\x01USD", "contains control characters"),
        ("BTC USD", "must be letters, digits"),
        ("", "cannot be used as a path component"),
    ],
)
def test_hostile_product_ids_are_rejected(product, reason):
    with pytest.raises(ConfigError) as err:
        parse_config({"coinbase": {"product_ids": ["BTC-USD", product]}})
    assert err.value.problems[0].startswith("coinbase.product_ids.1: ")
    assert reason in err.value.problems[0]


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "coinbase:\n  product_ids: [BTC-USD\n"), env={})
    assert "YAML syntax error" in err.value.problems[0] and "line" in err.value.problems[0]


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_free_form_options_mask_secret_looking_keys():
    secret_options = {"password": "hunter2", "x": 1}
    config = parse_config(
        {"ccxt": {"exchanges": {"kraken": {"channels": {"watchTrades": ["BTC/USD"]}, "options": secret_options}}}}
    )
    shown = effective_config(config)["ccxt"]["exchanges"]["kraken"]["options"]
    assert shown == {"password": "**********", "x": 1}


def test_batch_size_must_fit_the_queue():
    with pytest.raises(ConfigError, match="batch_size \\(500\\) must not exceed queue_maxsize \\(100\\)"):
        parse_config({"ingestion": {"batch_size": 500, "queue_maxsize": 100}})


def test_databento_section_is_checked_key_by_key():
    sub = {"dataset": "GLBX.MDP3", "schema": "mbo", "symbols": ["ESZ6"]}
    subs = [{**sub, "start": "2026-11-26T10:00:00"}, {**sub, "schema": "trades"}, {**sub, "dataset": "XNAS.ITCH"}]
    config = parse_config({"databento": {"enabled": True, "api_key": "db-k", "subscriptions": subs}})
    first = config.databento.subscriptions[0]
    assert (first.schema_, first.start_ns) == ("mbo", 1_795_687_200_000_000_000)
    assert config.databento.datasets == ["GLBX.MDP3", "XNAS.ITCH"]
    assert "db-k" not in repr(config.databento)
    bad = [
        ({"subscriptions": [{**sub, "dataset": "glbx"}]}, "not a Databento dataset id"),
        ({"subscriptions": [{**sub, "symbols": ["ES,NQ"]}]}, "not a Databento symbol"),
        ({"subscriptions": [{**sub, "snapshot": True, "start": 0}]}, "snapshot and start cannot be combined"),
        ({"subscriptions": [{**sub, "schema": "trades", "snapshot": True}]}, "snapshot is only for the mbo schema"),
        ({"enabled": True, "api_key": "db-k"}, "enabled with no subscriptions"),
        ({"enabled": True, "subscriptions": [sub]}, "enabled with no api_key"),
        ({"subscriptions": [{**sub, "schema": "mbp-5"}]}, "databento.subscriptions.0.schema"),
    ]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_config({"databento": section})
