"""The ``fedq`` command: run a coordinator, a site's worker, or a whole demo federation."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path

from pydantic_settings import BaseSettings

from coordinator.aggregators import AGGREGATORS
from coordinator.server_optimizers import SERVER_OPTIMIZERS
from coordinator.settings import CoordinatorSettings
from coordinator.staleness import STALENESS
from coordinator.strategies import STRATEGIES
from shared.codecs import CODECS
from shared.registry import Registry
from shared.settings import ENV_PREFIX, CommonSettings, SettingsError, load_settings
from worker.settings import WorkerSettings

def _choices(title: str, registry: Registry) -> str:
    """A section of --help listing a registry's plug-ins, one per line with its summary."""
    width = max(map(len, registry.names))
    return f"{title}:\n" + "\n".join(f"  {name:<{width}}  {registry.summary(name)}" for name in registry.names)


CHOICES = {
    "coordinator": "\n\n".join((
        _choices("strategies (--strategy)", STRATEGIES),
        _choices("buffer aggregations (--aggregation)", AGGREGATORS),
        _choices("staleness functions (--staleness)", STALENESS),
        _choices("server optimizers (--server-optimizer)", SERVER_OPTIMIZERS),
    )),
    "worker": _choices("codecs (--codec)", CODECS),
}
EXAMPLES = {
    "coordinator": """examples:
  fedq coordinator --broker-url amqps://coordinator:SECRET@broker.example.org:5671/fedq --strategy fedbuff
  FEDQ_STRATEGY=fedasync FEDQ_ALPHA=0.5 fedq coordinator --stop-at-accuracy 0.95""",
    "worker": """examples:
  fedq worker --site site-3 --broker-url amqps://site-3:SECRET@broker.example.org:5671/fedq
  fedq worker --site hospital-a --task mypkg.task:MyTask --codec fp16""",
    "demo": """examples:
  fedq demo                        # FedBuff on digits-straggler, ten sites, until 0.95 accuracy
  fedq demo --strategy fedavg      # the synchronous baseline, for comparison""",
    "status": """examples:
  fedq status --broker-url amqps://coordinator:SECRET@broker.example.org:5671/fedq
  fedq status --watch 5            # redraw every 5 s
  fedq status --json | jq .sites   # for scripts""",
}
# Settings that mean nothing to fedq status, which only reads what the coordinator published.
_STATUS_IGNORES = {"task", "log_level", "torch_threads"}


def _add_settings_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings], skip: set[str] = frozenset()) -> None:
    """One flag per setting, so flags, FEDQ_* variables and .env all name the same things."""
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        default = "required" if field.is_required() else f"default {field.default}"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} [{ENV_PREFIX}{name.upper()}; {default}]",
        )


def _settings_from(args: argparse.Namespace, cls: type[BaseSettings]):
    values = {}
    for name, field in cls.model_fields.items():
        value = getattr(args, name, None)
        # Lists and maps are JSON on the command line, as they are in FEDQ_* variables.
        if value is not None and typing.get_origin(field.annotation) in (list, dict):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise SettingsError(f"fedq cannot start: --{name.replace('_', '-')} takes JSON, such as [] or "
                                    f'{{"user": "site"}}; got {value!r}') from None
        values[name] = value
    return load_settings(cls, **values)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)-18s %(message)s", datefmt="%H:%M:%S")
    # pika logs every failed connection with a traceback; fedq says what failed and what to do itself.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.server import Coordinator, ModelDiverged
    from shared.task import load_task

    settings = _settings_from(args, CoordinatorSettings)
    _configure_logging(settings.log_level)
    try:
        summary = Coordinator(settings, load_task(settings.task)).run()
    except ModelDiverged as exc:
        print(f"fedq: {exc}", file=sys.stderr)
        return 1
    print(_describe(summary))
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from shared.task import load_task
    from worker.site import SiteWorker

    settings = _settings_from(args, WorkerSettings)
    _configure_logging(settings.log_level)
    # Dated from the process's start, not from here: importing PyTorch and building the task take
    # seconds, and a run that ended meanwhile (a site brought back just as its run reached the
    # target, in benchmarks/suite.py's churn) was taken for an earlier run, and the site waited on.
    SiteWorker(settings, load_task(settings.task), started_at=process_started_at()).run()
    return 0


def process_started_at() -> float:
    """When this process started, by the wall clock: Linux's /proc says it to the clock tick. Where it
    cannot be read, now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        # starttime is the stat file's 22nd field, in clock ticks since boot; fields[0] is the 3rd.
        started_since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def run_demo(args: argparse.Namespace) -> int:
    from fedq.local_broker import find_broker
    from fedq.federation import run_federation, site_names

    _configure_logging("INFO")
    broker = find_broker(log=logging.getLogger("fedq.demo").info)
    try:
        summary = run_federation(
            broker.url(),
            Path(args.run_dir),
            site_names(10),
            coordinator={"strategy": args.strategy, "stop_at_accuracy": args.target, "max_seconds": args.max_seconds},
            worker={"codec": args.codec},
            fresh=True,  # a demo is a new run every time; resuming the last one would end it at once
        )
    except KeyboardInterrupt:
        print(f"fedq demo: stopped by Ctrl-C; the run so far (model, checkpoint, logs) is in {args.run_dir}",
              file=sys.stderr)
        return 130
    finally:
        broker.close()
    print(_describe(summary))
    print(f"run log: {Path(args.run_dir) / 'events.jsonl'}; site logs: {Path(args.run_dir) / 'sites'}; "
          f"model: {Path(args.run_dir) / 'model.safetensors'}")
    reached = (summary.get("best_accuracy") or 0) >= args.target
    if not reached:
        print(f"the demo did not reach {args.target} accuracy; the site logs above say what the workers saw")
    return 0 if reached else 1


def run_report(args: argparse.Namespace) -> int:
    from coordinator.report import write_report

    try:
        written = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedq report: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from coordinator.export import export_run
    from shared.protocol import ProtocolError

    out = Path(args.out)
    try:
        version = export_run(Path(args.run_dir), out, args.version, args.task)
    except (FileNotFoundError, ValueError, ProtocolError) as exc:
        print(f"fedq export: {exc}", file=sys.stderr)
        return 2
    print(f"version {version} -> {out}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from coordinator.status import format_status
    from shared import transport

    settings = _settings_from(args, CommonSettings)
    try:
        link = transport.connect(settings.broker_url, settings.heartbeat, "fedq-status", **settings.tls_files())
    except transport.ConnectionFailed as exc:
        if transport.refused_by_broker(exc):
            raise
        print(f"fedq status: cannot reach the broker at {transport.broker_address(settings.broker_url)} ({exc!r}); "
              "check FEDQ_BROKER_URL and that this machine can reach it", file=sys.stderr)
        return 2
    try:
        reader = transport.StatusReader(link)
        while True:
            try:
                status = reader.read()
            except transport.ChannelClosed as exc:
                print(f"fedq status: the broker refused to read {transport.STATUS} ({exc.reply_text}); "
                      + ("use the coordinator's or an administrator's user: sites may not read it"
                         if exc.reply_code == 403 else "no coordinator has run in this vhost yet"), file=sys.stderr)
                return 2
            if status is None:
                print(f"fedq status: no coordinator has published its status in this vhost yet ({transport.STATUS} is "
                      "empty); is the coordinator running?", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(status.model_dump(mode="json")), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[H\033[J", end="")
                print(format_status(status), flush=True)
            if not args.watch:
                return 0
            link.sleep(args.watch)
    finally:
        link.close()


def run_provision(args: argparse.Namespace) -> int:
    from fedq.provision import BundleError, check_bundle, provision_sites, write_bundle

    password = args.admin_password or os.environ.get("FEDQ_ADMIN_PASSWORD")
    if not password:
        print("fedq provision needs the admin password: --admin-password or FEDQ_ADMIN_PASSWORD", file=sys.stderr)
        return 2
    if args.bundle is None and (args.ca_file or args.force):
        print("fedq provision: --ca-file and --force go with --bundle DIR; add it, or leave them out to print the "
              "settings", file=sys.stderr)
        return 2
    ca_file = Path(args.ca_file) if args.ca_file else None
    if args.bundle is not None:
        try:
            ca = check_bundle(Path(args.bundle), args.sites, bool(args.coordinator), ca_file, not args.plain, args.force)
        except BundleError as exc:
            print(f"fedq provision: {exc}", file=sys.stderr)
            return 2
    if args.definitions:
        from fedq.local_broker import load_vhost_definitions

        load_vhost_definitions(args.management_url, args.admin_user, password, args.vhost)
        print(f"# loaded fedq's exchanges, queues, bindings and policies into vhost {args.vhost!r}")
    created = provision_sites(args.management_url, args.admin_user, password, args.vhost, args.sites,
                              args.broker_host, args.broker_port, tls=not args.plain, coordinator_user=args.coordinator)
    if args.bundle is not None:
        # The passwords go only into the bundle's private files, never to a terminal or a CI log.
        address = ", ".join(f"{host.strip()}:{args.broker_port}" for host in args.broker_host.split(","))
        written = write_bundle(Path(args.bundle), created, ca, ca_file, address)
        print(f"# provisioned in vhost {args.vhost!r}. Give each site its folder, privately:")
        for path in written:
            print(path)
        return 0
    print(f"# provisioned in vhost {args.vhost!r}. Give each its lines, privately:")
    for entry in created:
        if entry.site:
            print(f"\n# site {entry.site}\nFEDQ_SITE={entry.site}\nFEDQ_BROKER_URL={entry.broker_url}")
        else:
            print(f"\n# coordinator\nFEDQ_BROKER_URL={entry.broker_url}\nFEDQ_ANY_SITE_USERS=[]")
    return 0


def _describe(summary: dict) -> str:
    times = "  ".join(
        f"time to {m}: {'%.1f s' % t if t is not None else 'not reached'}" for m, t in summary["time_to_accuracy"].items()
    )
    # A task without a test set at the coordinator, whose sites were never asked to score, has none.
    final = "not scored" if summary["final_accuracy"] is None else f"{summary['final_accuracy']:.4f}"
    return (
        f"{summary['strategy']}: {times}  final accuracy {final}  version {summary['final_version']}  "
        f"updates {summary['updates_applied']} applied, {summary['updates_dropped']} dropped, "
        f"{summary['updates_rejected']} refused  ({summary['stop_reason']})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedq",
        description="Asynchronous federated training over RabbitMQ. Settings come from flags, then "
        f"{ENV_PREFIX}* environment variables, then a .env file.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter

    for name, settings, handler, summary, description in (
        ("coordinator", CoordinatorSettings, run_coordinator, "run the coordinator",
         "Own the global model: publish snapshots, merge site updates as they arrive, evaluate."),
        ("worker", WorkerSettings, run_worker, "run one site's worker",
         "Train on this site's data: take the newest snapshot, train, send the update. Connects outbound only."),
    ):
        process = commands.add_parser(name, help=summary, description=description, formatter_class=formatter,
                                      epilog=f"{CHOICES[name]}\n\n{EXAMPLES[name]}")
        _add_settings_flags(process, settings)
        process.set_defaults(handler=handler)

    demo = commands.add_parser(
        "demo", help="run a whole demo federation on a local broker", epilog=EXAMPLES["demo"], formatter_class=formatter,
        description="Find or start a RabbitMQ broker, then run a coordinator and ten sites on digits-straggler.",
    )
    demo.add_argument("--strategy", choices=STRATEGIES.names, default="fedbuff",
                      help="how updates are merged (default fedbuff; see fedq coordinator --help)")
    demo.add_argument("--codec", choices=CODECS.names, default="fp32",
                      help="codec for site updates (default fp32; see fedq worker --help)")
    demo.add_argument("--target", type=float, default=0.95, help="stop at this test accuracy (default 0.95)")
    demo.add_argument("--max-seconds", type=float, default=300.0, help="give up after this long (default 300)")
    demo.add_argument("--run-dir", default="runs/demo", help="where the run log goes (default runs/demo)")
    demo.set_defaults(handler=run_demo)

    report = commands.add_parser(
        "report", help="plot a run's log", formatter_class=formatter,
        description="Write PNGs of accuracy and loss against time and version, the staleness histogram and "
        "per-site contributions, and a report.html that shows them, from a coordinator's run folder.",
        epilog="""examples:
  fedq report runs/demo                 # writes runs/demo/report.html and its PNGs
  fedq report runs/latest --out /tmp/r""",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the coordinator's run folder (holds events.jsonl)")
    report.add_argument("--out", help="where to write the report (default: RUN_DIR)")
    report.set_defaults(handler=run_report)

    export = commands.add_parser(
        "export", help="write a run's model as safetensors", formatter_class=formatter,
        description="Write a version of a run's global model as a safetensors file of the task's own state_dict "
        "(frozen and trained parts together), which model.load_state_dict(safetensors.torch.load_file(PATH)) "
        "loads. A run folder keeps its checkpointed version and its best scored one; the coordinator also leaves "
        "model.safetensors (final) and model-best.safetensors in it.",
        epilog="""examples:
  fedq export runs/latest --out model.safetensors               # the checkpointed (newest) version
  fedq export runs/latest --version 42 --out v42.safetensors    # the best scored, if it was version 42""",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the coordinator's run folder (holds checkpoint.fedq)")
    export.add_argument("--out", required=True, help="the safetensors file to write")
    export.add_argument("--version", type=int, help="the version to write (default: the checkpointed one)")
    export.add_argument("--task", help="the task that builds the model, module:Class (default: the run's own)")
    export.set_defaults(handler=run_export)

    status = commands.add_parser(
        "status", help="show the coordinator's state and every site's", epilog=EXAMPLES["status"], formatter_class=formatter,
        description="Print the sites (last seen, base version, staleness, updates applied and refused, bytes in) and "
        "the global state (version, last evaluation, queue depths), as the coordinator last published them on the "
        "broker. Works from any machine that can reach the broker, with the coordinator's or an administrator's user.",
    )
    _add_settings_flags(status, CommonSettings, skip=_STATUS_IGNORES)
    status.add_argument("--watch", type=float, metavar="SECONDS", help="print again every SECONDS until interrupted")
    status.add_argument("--json", action="store_true", help="print the status as JSON, one object per line")
    status.set_defaults(handler=run_status)

    provision = commands.add_parser(
        "provision", help="create broker users for sites", formatter_class=formatter,
        description="Create one broker user per site, with a generated password and only the permissions a site "
        "needs (its own announcement queue, the snapshot stream, publishing updates), and print each site's settings, "
        "or with --bundle write each site a folder to join with: site.env, the CA certificate, start.sh, README.txt.",
        epilog="""examples:
  FEDQ_ADMIN_PASSWORD=... fedq provision hospital-a hospital-b --management-url https://broker.example.org:15671 \\
      --broker-host broker.example.org
  FEDQ_ADMIN_PASSWORD=... fedq provision hospital-a hospital-b --coordinator central --broker-host broker.example.org \\
      --bundle bundles --ca-file ca.pem     # bundles/hospital-a/, bundles/hospital-b/, bundles/coordinator.env""",
    )
    provision.add_argument("sites", nargs="+", metavar="SITE", help="site names, e.g. site-0 hospital-a")
    provision.add_argument("--management-url", default="http://127.0.0.1:15672", help="RabbitMQ management API")
    provision.add_argument("--admin-user", default="fedq", help="a management user with the administrator tag")
    provision.add_argument("--admin-password", help="its password (or FEDQ_ADMIN_PASSWORD)")
    provision.add_argument("--vhost", default="fedq")
    provision.add_argument("--broker-host", default="127.0.0.1",
                           help="the host sites connect to; for a cluster, each node's, comma-separated")
    provision.add_argument("--broker-port", type=int, default=5671, help="the AMQP port sites connect to (default 5671)")
    provision.add_argument("--plain", action="store_true", help="amqp:// without TLS (development only)")
    provision.add_argument("--coordinator", metavar="USER", help="also create the coordinator's user")
    provision.add_argument("--definitions", action="store_true",
                           help="first load fedq's exchanges, queues, bindings and policies (broker_config/"
                           "definitions.json) into the vhost, creating it if missing: for a broker started without "
                           "them, as docker-compose.production.yml's is")
    provision.add_argument("--bundle", metavar="DIR",
                           help="write DIR/SITE/ per site (site.env, ca.pem, start.sh, README.txt; private, mode 0700) "
                           "and DIR/coordinator.env instead of printing passwords")
    provision.add_argument("--ca-file", metavar="PATH",
                           help="with --bundle: the CA certificate that signed the broker's, copied into each bundle "
                           "(needed unless --plain)")
    provision.add_argument("--force", action="store_true",
                           help="with --bundle: overwrite existing bundle folders (their old passwords stop working)")
    provision.set_defaults(handler=run_provision)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shared.model_state import TaskMismatch
    from shared.transport import REFUSALS, ManagementError, TLSSetupError, TopologyMismatch, refused_by_broker

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SettingsError, TLSSetupError, TopologyMismatch, TaskMismatch, ManagementError) as exc:
        print(exc if isinstance(exc, SettingsError) else f"fedq: {exc}", file=sys.stderr)
        return 2
    except REFUSALS as exc:
        if refused_by_broker(exc):
            print(f"fedq: the broker refused this user or vhost ({exc}); check the user, password and vhost in "
                  "FEDQ_BROKER_URL", file=sys.stderr)
        else:
            print(f"fedq: the connection to the broker was lost while logging in ({exc}); check that the broker "
                  "is reachable, then try again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
