"""docker-compose.yml must agree with the repository: files it uses exist, and its services reach the
broker it configures, with the definitions whose names the code declares."""

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from shared import transport

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_every_mounted_or_built_file_exists():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert (context / "Dockerfile").exists(), f"{name} builds from {context} without a Dockerfile"
    for copied in re.findall(r"^COPY (\S+)", (ROOT / "Dockerfile").read_text(), re.M):
        assert (ROOT / copied).exists(), f"the Dockerfile copies {copied}, which does not exist"


def test_the_broker_loads_the_definitions_the_code_declares():
    broker = SERVICES["rabbitmq"]
    mounts = dict(v.split(":")[:2] for v in broker["volumes"])
    conf = (ROOT / "broker_config" / "rabbitmq.conf").read_text()
    load_path = re.search(r"^load_definitions = (\S+)", conf, re.M).group(1)
    assert mounts["./broker_config/definitions.json"] == load_path
    assert mounts["./broker_config/rabbitmq.conf"] == "/etc/rabbitmq/rabbitmq.conf"
    definitions = json.loads((ROOT / "broker_config" / "definitions.json").read_text())
    assert {q["name"] for q in definitions["queues"]} == set(transport.QUEUES)
    assert {e["name"] for e in definitions["exchanges"]} == set(transport.EXCHANGES)


def test_every_fedq_service_reaches_that_broker_and_its_vhost():
    definitions = json.loads((ROOT / "broker_config" / "definitions.json").read_text())
    vhosts = {v["name"] for v in definitions["vhosts"]}
    users = {u["name"] for u in definitions["users"]}
    fedq_services = {n: s for n, s in SERVICES.items() if n != "rabbitmq"}
    assert fedq_services, "the compose file runs a coordinator and sites"
    for name, service in fedq_services.items():
        url = urlparse(service["environment"]["FEDQ_BROKER_URL"])
        assert url.hostname == "rabbitmq" and url.port == 5672, name
        assert url.path.lstrip("/") in vhosts and url.username in users, name
    sites = [s["environment"]["FEDQ_SITE"] for n, s in fedq_services.items() if s["command"] == ["worker"]]
    assert len(sites) == len(set(sites)) >= 3


@pytest.mark.broker
def test_the_compose_federation_reaches_its_target_with_its_own_settings(broker_url, tmp_path):
    """The stack's coordinator and site settings, run as processes on a local broker: what `docker
    compose up` runs reaches the accuracy its coordinator stops at."""
    from fedq.federation import run_federation

    def settings(environment: dict[str, str]) -> dict[str, str]:
        # Where the stack connects, writes and listens is the container's business, not the run's.
        local = {"FEDQ_BROKER_URL", "FEDQ_RUN_DIR", "FEDQ_METRICS_HOST", "FEDQ_SITE"}
        return {key.removeprefix("FEDQ_").lower(): value for key, value in environment.items() if key not in local}

    coordinator = settings(SERVICES["coordinator"]["environment"])
    sites = {s["environment"]["FEDQ_SITE"]: settings(s["environment"]) for s in SERVICES.values()
             if s.get("command") == ["worker"]}
    target = float(coordinator["stop_at_accuracy"])
    summary = run_federation(broker_url, tmp_path, sorted(sites), coordinator={**coordinator, "max_seconds": 180},
                             site_settings=sites)
    assert summary["best_accuracy"] >= target, summary["stop_reason"]
