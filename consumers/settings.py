"""``streamlstm serve`` settings: flags, ``STREAMLSTM_*`` variables and a TOML file.

Precedence, highest first: command-line flag, environment variable, TOML
file (``--config FILE``), default. Every field is validated once, here.
"""

from __future__ import annotations

import argparse
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from streamlstm.errors import ConfigError
from streamlstm.optional import require_cold
from streamlstm.swap_policy import SWAP_POLICIES

__all__ = ["ServeConfig", "parse_serve_args"]

ENV_PREFIX = "STREAMLSTM_"


#: The settings that take one of a few words.
_CHOICES = {
    "state": ("durable", "memory"),
    "guarantee": ("at-least-once", "exactly-once"),
    "quality_metrics": ("on", "off"),
    "swap_state": SWAP_POLICIES,
    "auto_offset_reset": ("earliest", "latest"),
    "isolation_level": ("read_committed", "read_uncommitted"),
}


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    model: str
    bootstrap_servers: str
    input_topic: str
    output_topic: str
    dlq_topic: str | None = None
    metrics_topic: str | None = None
    group_id: str = "streamlstm"
    #: Static membership (KIP-345): a restart within the session timeout does not rebalance.
    group_instance_id: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9464
    #: The stream admin API (docs/admin-api.md): off unless a port is given (0 picks a
    #: free one); every request needs the bearer token held in admin_token_file.
    admin_port: int | None = None
    admin_host: str = "0.0.0.0"
    admin_token_file: str | None = None
    #: How long a reset or delete through the admin API waits for its control to be
    #: applied before answering 504 (it is applied later all the same).
    admin_wait_s: float = 10.0
    metrics_interval_s: float = 10.0
    max_records: int = 1024
    #: Daemon-added latency p99 to keep under (ms): each poll's size is then chosen from
    #: the measured step times and the queue, up to max_records (consumers/batch_sizing.py).
    #: None: every poll asks for max_records.
    latency_target_ms: float | None = None
    max_unacked_batches: int = 8
    engine_threads: int = 1
    max_streams: int = 1_000_000
    #: The cold tier (docs/cold-tier.md): a stream evicted for room (max_streams) is kept
    #: on local disk here, one RocksDB store per input partition, instead of dropped, and
    #: read back when it ticks again. None: no cold tier. Needs the cold extra.
    state_dir: str | None = None
    #: The cold tier holds at most this many streams on disk, all input partitions' stores
    #: together (oldest out).
    max_disk_streams: int = 10_000_000
    #: With a state dir and durable state, each input partition also keeps a local
    #: checkpoint there (a restart reads only the changelog after it); one of a partition
    #: that moved away is kept this long in case it comes back, then deleted (Kafka
    #: Streams' state.cleanup.delay.ms, also 10 minutes).
    state_cleanup_delay_s: float = 600.0
    idle_ttl_s: float | None = None
    #: Input drift (streamlstm_input_drift_z): the span, in ticks of all streams, of the
    #: exponentially weighted mean and variance compared with the training data.
    drift_window_ticks: int = 10_000
    #: "on": measure the model's live quality (realized errors, drift, anomaly rates; see
    #: docs/model-quality.md); "off": not at all (no per-stream columns, no series).
    quality_metrics: str = "on"
    max_value_bytes: int = 64 * 1024
    linger_ms: int = 0
    fetch_max_wait_ms: int = 10
    max_batch_bytes: int = 1024 * 1024
    max_request_bytes: int = 4 * 1024 * 1024
    compression_type: str | None = None
    #: "durable": each stream's state is checkpointed to a compacted changelog topic and
    #: restored where its partition goes (needs a broker with compaction and topic
    #: configs, such as Apache Kafka); "memory": state lives in this process only.
    state: str = "durable"
    changelog_topic: str | None = None  # default: <group>-<input topic>-changelog
    #: "at-least-once": a crash may publish a tick's prediction again (identical values);
    #: "exactly-once": transactions, so read_committed consumers see each once (needs
    #: durable state and a broker with transactions).
    guarantee: str = "at-least-once"
    #: Exactly-once: transactional.id = <prefix>-<input topic>-<partition>; default: the group.
    transactional_id_prefix: str | None = None
    changelog_replication_factor: int = 1
    #: Durable state: checkpoint (changelog, then offsets) this often. Memory state: commit
    #: acknowledged offsets at most this often (a commit a poll cost CPU the ticks needed).
    commit_interval_ms: int = 1000
    #: What a new model does with each stream's state, on a live reload and on a restore
    #: of states another model made (one rule for both: streamlstm/swap_policy.py):
    #: "auto" carries it where the new model is a retrain of the same model (same bundle
    #: name and layer sizes) and resets it otherwise; "carry" wherever the sizes allow;
    #: "reset" never.
    swap_state: str = "auto"
    #: Each stream's last raw ticks kept (with its state, and in its changelog record)
    #: for a re-warm: a swap that does not carry the state runs the new model over
    #: them. 0: none kept, and a re-warm is a reset. Memory: ticks x inputs x 4 bytes a
    #: stream.
    history_ticks: int = 0
    #: The older name of swap_state, still read: "reset", or "keep-if-compatible" (carry).
    on_model_change: str | None = None
    #: Look for a new model this often (seconds) and reload when --model resolves to
    #: another bundle; None: only on SIGHUP or POST /v1/model/reload.
    model_watch_s: float | None = None
    #: A candidate model (a bundle or a directory of versions, as --model) run on the
    #: same ticks in the same engine, with its own states (changelogged under their own
    #: keys), its predictions to shadow_topic and its live quality under model="shadow";
    #: a reload to its model promotes it (docs/model-reload.md). None: no shadow.
    shadow_model: str | None = None
    #: Where the shadow's predictions go (required with shadow_model; never the output).
    shadow_topic: str | None = None
    #: A dead letter's key, value and headers are cut to fit this many bytes (the original
    #: size goes in a header); below the topic's max.message.bytes (Kafka: 1048588).
    dlq_max_record_bytes: int = 1_040_000
    create_topics: bool = False
    topic_partitions: int = 4
    topic_replication_factor: int = 1
    auto_offset_reset: str = "earliest"
    isolation_level: str = "read_uncommitted"
    #: Past this, a step is taken as a wedged engine: the daemon fails (and /healthz with it).
    step_timeout_s: float = 30.0
    #: Below Kubernetes' default grace period (30 s), so a drain finishes before SIGKILL.
    shutdown_timeout_s: float = 20.0
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "bootstrap_servers", "input_topic", "output_topic", "group_id"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if self.dlq_topic is None:
            object.__setattr__(self, "dlq_topic", f"{self.input_topic}-dlq")
        if self.changelog_topic is None:
            name = f"{self.group_id}-{self.input_topic}-changelog"
            object.__setattr__(self, "changelog_topic", name)
        self._read_on_model_change()
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: must be {' or '.join(allowed)}")
        if self.guarantee == "exactly-once" and self.state != "durable":
            raise ConfigError(
                "guarantee: exactly-once needs --state durable (the state must commit "
                "with the outputs and offsets)"
            )
        if self.transactional_id_prefix is None:
            object.__setattr__(self, "transactional_id_prefix", self.group_id)
        for name in (
            "max_records",
            "max_unacked_batches",
            "engine_threads",
            "max_streams",
            "max_value_bytes",
            "topic_partitions",
            "topic_replication_factor",
            "dlq_max_record_bytes",
            "changelog_replication_factor",
            "commit_interval_ms",
            "drift_window_ticks",
            "max_disk_streams",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.max_records > self.max_streams:
            raise ConfigError("max_records: must not exceed max_streams")
        for name in ("metrics_interval_s", "shutdown_timeout_s", "step_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        # Written so that NaN fails too.
        if self.latency_target_ms is not None and not self.latency_target_ms > 0:
            raise ConfigError("latency_target_ms: must be positive")
        self._check_state_options()
        if self.model_watch_s is not None and not 0 < self.model_watch_s <= 86400:
            raise ConfigError("model_watch_s: must be in (0, 86400] seconds")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port: must be 0..65535 (0 picks a free port)")
        self._check_admin()
        if self.dlq_max_record_bytes > self.max_request_bytes // 2:
            raise ConfigError("dlq_max_record_bytes: must be at most half of max_request_bytes")
        if self.compression_type not in (None, "gzip", "snappy", "lz4", "zstd"):
            raise ConfigError("compression_type: must be gzip, snappy, lz4 or zstd")
        self._check_topics()

    def _check_topics(self) -> None:
        if (self.shadow_model is None) != (self.shadow_topic is None):
            raise ConfigError("shadow_topic: required with shadow_model, and only with it")
        named = [self.input_topic, self.output_topic, self.dlq_topic]
        named += [self.changelog_topic] if self.state == "durable" else []
        named += [self.shadow_topic] if self.shadow_topic is not None else []
        if len(set(named)) != len(named):
            raise ConfigError(
                "output_topic/dlq_topic/changelog_topic/shadow_topic: must differ from each "
                "other and the input"
            )

    def _read_on_model_change(self) -> None:
        """The older flag, where given, as the swap_state it meant."""
        if self.on_model_change is None:
            return
        meant = {"reset": "reset", "keep-if-compatible": "carry"}.get(self.on_model_change)
        if meant is None:
            raise ConfigError("on_model_change: must be reset or keep-if-compatible")
        object.__setattr__(self, "swap_state", meant)

    def _check_state_options(self) -> None:
        if not 0 <= self.history_ticks <= 65535:
            raise ConfigError("history_ticks: must be 0..65535")
        if self.state_dir is not None:  # here, not in the engine child: a clear start-up error
            require_cold("--state-dir (the cold tier)")
        # Written so that NaN fails too.
        if not self.state_cleanup_delay_s >= 0:
            raise ConfigError("state_cleanup_delay_s: must be zero or more seconds")

    def _check_admin(self) -> None:
        if self.admin_port is None:
            return
        if not 0 <= self.admin_port < 65536:
            raise ConfigError("admin_port: must be 0..65535 (0 picks a free port)")
        if self.admin_port and self.admin_port == self.metrics_port:
            raise ConfigError("admin_port: must differ from metrics_port")
        if not self.admin_token_file:
            raise ConfigError("admin_token_file: required with admin_port (the bearer token)")
        if not 0 < self.admin_wait_s <= 300:
            raise ConfigError("admin_wait_s: must be in (0, 300]")

    def producer_settings(self) -> dict[str, Any]:
        """Every producer's settings but the connection's (acks=all: nothing is lost)."""
        return {
            "acks": "all",
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_bytes,
            "max_request_size": self.max_request_bytes,
            "compression_type": self.compression_type,
        }

    def consumer_settings(self) -> dict[str, Any]:
        """The input consumer's settings but the connection's and the assignor."""
        return {
            "group_id": self.group_id,
            "enable_auto_commit": False,  # the committer commits, after the output is acked
            "auto_offset_reset": self.auto_offset_reset,
            "max_partition_fetch_bytes": self.max_request_bytes,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "group_instance_id": self.group_instance_id,
            "isolation_level": self.isolation_level,
        }


def _base_type(annotation: Any) -> type:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return annotation  # type: ignore[no-any-return]


def _convert(name: str, kind: type, raw: object) -> object:
    if raw is None or (isinstance(raw, kind) and not (kind is int and isinstance(raw, bool))):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind in (int, float):
            return kind(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {raw!r} is not a valid {kind.__name__}") from exc
    return text or None


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> ServeConfig:
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(ServeConfig)
    parser = argparse.ArgumentParser(
        prog="streamlstm serve",
        description="Serve a model over Kafka. Every flag also reads STREAMLSTM_<FLAG>.",
    )
    parser.add_argument("--config", help="TOML file with any of the settings below")
    for f in fields(ServeConfig):
        kind = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = None if f.default is MISSING else f.default
        if kind is bool:
            parser.add_argument(
                flag,
                action="store_const",
                const=True,
                default=None,
                help=f"[env {env}] (default {default})",
            )
        else:
            parser.add_argument(
                flag,
                default=None,
                metavar=f.name.split("_")[-1].upper(),
                help=f"[env {env}] (default {default})",
            )
    args = vars(parser.parse_args(list(argv)))
    config_file = args.pop("config") or environ.get(ENV_PREFIX + "CONFIG")
    values: dict[str, object] = {}
    if config_file:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config: cannot read {config_file}: {exc}") from exc
        known = {f.name for f in fields(ServeConfig)}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"config: unknown setting {key!r} in {config_file}")
            values[name] = value
    for f in fields(ServeConfig):
        env_value = environ.get(ENV_PREFIX + f.name.upper())
        if env_value is not None:
            values[f.name] = env_value
        if args[f.name] is not None:
            values[f.name] = args[f.name]
    converted = {name: _convert(name, _base_type(hints[name]), raw) for name, raw in values.items()}
    missing = [
        f.name
        for f in fields(ServeConfig)
        if f.default is MISSING and f.default_factory is MISSING and f.name not in converted
    ]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"missing required setting(s): {flags}")
    return ServeConfig(**converted)  # type: ignore[arg-type]
