"""The Apache Kafka broker's jars (resolved from Maven Central once into a cache) and JVM settings.

A tiny pom resolved with ``mvn dependency:copy-dependencies`` into
``$STREAMLSTM_KAFKA_CACHE/<version>/libs`` (default
``~/.cache/streamlstm/kafka/<version>/libs``): Java 17 and Maven are all the
local broker needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamlstm.errors import BrokerError

__all__ = ["JVM_OPTIONS", "KAFKA_VERSION", "LOG4J2_PROPERTIES", "kafka_libs", "need"]

#: The Apache Kafka release the local broker runs (``org.apache.kafka:kafka_2.13``).
KAFKA_VERSION = "4.4.0"

#: slf4j 1.x -> log4j2 binding: the server's jars bring slf4j-api and log4j-core but no binding.
_LOG4J_VERSION = "2.25.5"
_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local</groupId>
  <artifactId>streamlstm-kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


def _cache_root() -> Path:
    root = os.environ.get("STREAMLSTM_KAFKA_CACHE")
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "streamlstm" / "kafka"


def need(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(
            f"Apache Kafka needs {what} ({tool!r} is not on PATH): install it, "
            "or use the Tansu broker (--kind tansu)"
        )
    return path


def kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """The directory of the broker's jars, downloaded from Maven Central the first time.

    The download goes into a temporary directory beside the cache and is
    renamed into place when complete, so a killed download leaves no half cache.
    """
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 4:
        raise BrokerError(f"KafkaCluster runs Apache Kafka 4.x (KRaft, log4j2), not {version!r}")
    libs = _cache_root() / version / "libs"
    if libs.is_dir():
        return libs
    mvn = need("mvn", "Maven")
    libs.parent.mkdir(parents=True, exist_ok=True)
    for stale in libs.parent.glob(".download-*"):  # left by a killed download
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    print(
        f"downloading Apache Kafka {version} from Maven Central into {libs} (once)...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(dir=libs.parent, prefix=".download-") as tmp:
        (Path(tmp) / "pom.xml").write_text(_POM.format(version=version, log4j=_LOG4J_VERSION))
        proc = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
                f"-DoutputDirectory={tmp}/libs",
                "-DincludeScope=runtime",
            ],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        jar = Path(tmp) / "libs" / f"kafka_2.13-{version}.jar"
        if proc.returncode != 0 or not jar.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise BrokerError(
                f"Maven could not resolve org.apache.kafka:kafka_2.13:{version} "
                f"(exit {proc.returncode}):\n{tail}"
            )
        with contextlib.suppress(OSError):  # another process finished first: keep theirs
            os.rename(Path(tmp) / "libs", libs)
    return libs


# Warnings and errors only, plus the one line that says the server started.
LOG4J2_PROPERTIES = """status = error
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""

#: C1 only (TieredStopAtLevel=1) starts a node in about a third of the time (measured on
#: 2 cores: one node 2.5 s instead of 6.6 s, three 9.7 s instead of 16.3 s); pass
#: ``jvm_options`` without it for long throughput runs.
JVM_OPTIONS: tuple[str, ...] = (
    "-Xms64m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)
