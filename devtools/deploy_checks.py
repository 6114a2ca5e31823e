"""deploy.sh's readings of gcloud's JSON: what an organisation policy allows, whether a Cloud SQL
instance can serve the deployment, whether a queue has the settings deploy.sh gives it.

    python3 devtools/deploy_checks.py public-access REQUESTED DOMAINS.json MEMBERS.json INVOKER.json
    python3 devtools/deploy_checks.py instance INSTANCE.json IAM_AUTH IP_TYPE
    python3 devtools/deploy_checks.py queue QUEUE.json MAX_ATTEMPTS MIN_BACKOFF MAX_BACKOFF \
        MAX_DOUBLINGS MAX_DISPATCHES_PER_SECOND MAX_CONCURRENT_DISPATCHES

Standard library only: deploy.sh runs it with whatever python3 the operator has (gcloud needs one).
A policy file holds `gcloud org-policies describe CONSTRAINT --effective --format json`, `{}` when
gcloud found none, or nothing when it could not be read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ALL_USERS = "all-users"
NO_IAM_CHECK = "no-invoker-iam-check"
# Exit status when the public functions cannot be made public at all: deploy.sh stops before
# deploying anything.
BLOCKED = 3


def _load(path: str) -> Any:
    text = Path(path).read_text(encoding="utf-8").strip()
    return None if not text else json.loads(text)


def _rules(policy: Any) -> list[dict[str, Any]]:
    spec = (policy or {}).get("spec") or {}
    return list(spec.get("rules") or [])


def refuses_all_users(domains: Any, members: Any) -> str | None:
    """Why the organisation refuses an allUsers binding, or None if it does not.

    `iam.allowedPolicyMemberDomains` (domain restricted sharing, a list constraint) refuses allUsers
    under any rule other than allowAll; its managed successor `iam.managed.allowedPolicyMembers`
    refuses it when enforced unless its parameters list allUsers. A conditional rule counts as
    refusing: it may apply to the functions."""
    for rule in _rules(domains):
        if rule.get("allowAll") is True and not rule.get("condition"):
            continue
        if rule.get("denyAll") or rule.get("values") or rule.get("condition"):
            return "iam.allowedPolicyMemberDomains (domain restricted sharing) is set on the project"
    for rule in _rules(members):
        if rule.get("enforce") is True or rule.get("enforce") == "true":
            allowed = (rule.get("parameters") or {}).get("allowedMemberSubjects") or []
            if "allUsers" not in allowed:
                return "iam.managed.allowedPolicyMembers is enforced on the project"
    return None


def requires_invoker_iam(invoker: Any) -> bool:
    """`run.managed.requireInvokerIam` forbids turning a service's invoker IAM check off."""
    return any(rule.get("enforce") is True or rule.get("enforce") == "true" for rule in _rules(invoker))


def public_access(requested: str, domains: Any, members: Any, invoker: Any) -> tuple[str, list[str]]:
    """How to make the user-facing functions public: `all-users` (the allUsers invoker binding) or
    `no-invoker-iam-check` (Cloud Run's invoker check off, the way Google documents for projects
    under domain restricted sharing). Raises SystemExit(BLOCKED) with what to change when neither
    is allowed, or when the requested one is not."""
    notes: list[str] = []
    refusal = refuses_all_users(domains, members)
    if domains is None:
        notes.append(
            "could not read the organisation policy iam.allowedPolicyMemberDomains; if allUsers is "
            "refused while deploying, deploy.sh turns the invoker IAM check off instead"
        )
    strict = requires_invoker_iam(invoker)
    if requested == ALL_USERS and refusal:
        raise _blocked(
            f"--public-access {ALL_USERS} cannot work here: {refusal}, which refuses allUsers. Use "
            f"--public-access {NO_IAM_CHECK} (or auto), or have an organisation administrator allow "
            "allUsers for this project."
        )
    if requested == NO_IAM_CHECK or (requested == "auto" and refusal):
        if strict:
            because = f"{refusal}, which refuses allUsers, and " if refusal else ""
            raise _blocked(
                f"The user-facing functions cannot be made public: {because}run.managed.requireInvokerIam "
                "forbids turning Cloud Run's invoker IAM check off. Have an organisation administrator "
                "exempt this project from one of the two constraints"
                + (f", or use --public-access {ALL_USERS} if allUsers is allowed." if not refusal else ".")
            )
        if requested == "auto":
            notes.append(f"{refusal}: the public functions get Cloud Run's invoker IAM check off instead")
        return NO_IAM_CHECK, notes
    return ALL_USERS, notes


def _blocked(message: str) -> SystemExit:
    print(message, file=sys.stderr)
    return SystemExit(BLOCKED)


def instance_problems(instance: dict[str, Any], iam_auth: bool, ip_type: str) -> list[str]:
    """What stops this Cloud SQL instance from serving the deployment; empty when nothing does."""
    name = instance.get("name", "the instance")
    problems = []
    state = instance.get("state")
    if state and state != "RUNNABLE":
        problems.append(f"Cloud SQL instance {name} is {state}, not RUNNABLE")
    if not str(instance.get("databaseVersion", "POSTGRES")).startswith("POSTGRES"):
        problems.append(f"Cloud SQL instance {name} is {instance.get('databaseVersion')}, not PostgreSQL")
    settings = instance.get("settings") or {}
    if iam_auth:
        flags = {f.get("name"): str(f.get("value", "")).lower() for f in settings.get("databaseFlags") or []}
        if flags.get("cloudsql.iam_authentication") != "on":
            problems.append(
                f"Cloud SQL instance {name} does not have cloudsql.iam_authentication=on, which IAM database "
                f"auth needs. Add it to the instance's flags (gcloud sql instances patch {name} "
                "--database-flags cloudsql.iam_authentication=on,<every flag it already has>: the list "
                "replaces them all), or use --db-password-secret"
            )
    ip = settings.get("ipConfiguration") or {}
    if ip_type == "public" and ip.get("ipv4Enabled") is False:
        problems.append(
            f"Cloud SQL instance {name} has no public IP: use --db-ip-type private with --vpc-connector"
        )
    if ip_type == "private" and not ip.get("privateNetwork"):
        problems.append(
            f"Cloud SQL instance {name} has no private IP (no private network): use --db-ip-type public"
        )
    if ip_type == "psc" and not (ip.get("pscConfig") or {}).get("pscEnabled"):
        problems.append(f"Cloud SQL instance {name} does not have Private Service Connect enabled")
    return problems


# Cloud SQL for PostgreSQL's default max_connections by the tier's memory ("Quotas and limits"),
# for an instance without a max_connections flag: (memory below this many MB, connections).
_DEFAULT_CONNECTIONS_BY_MB = (
    (6144, 100),
    (7680, 200),
    (15360, 400),
    (30720, 500),
    (61440, 600),
    (122880, 800),
)
_SHARED_CORE = {"db-f1-micro": 25, "db-g1-small": 50}


def connection_limit(instance: dict[str, Any]) -> tuple[int | None, str]:
    """The instance's max_connections and where it comes from (its flag, else its tier's default)."""
    name = instance.get("name", "the instance")
    settings = instance.get("settings") or {}
    flags = {f.get("name"): f.get("value") for f in settings.get("databaseFlags") or []}
    if str(flags.get("max_connections", "")).isdigit():
        return int(flags["max_connections"]), f"Cloud SQL instance {name}"
    tier = str(settings.get("tier", ""))
    origin = f"Cloud SQL instance {name} (tier {tier}'s default)"
    if tier in _SHARED_CORE:
        return _SHARED_CORE[tier], origin
    memory = tier.rsplit("-", 1)[-1]
    if tier.startswith("db-custom-") and memory.isdigit():
        mb = int(memory)
        return next((n for below, n in _DEFAULT_CONNECTIONS_BY_MB if mb < below), 1000), origin
    return None, origin


def connection_problems(total: int, parts: str, limit: int, origin: str, reserve: int) -> list[str]:
    """The connection budget: every function at its max instances with its pool full must fit the
    instance's max_connections minus a reserve (superuser slots, Cloud SQL's agents, migrations,
    operators), or at full scale requests fail with "too many clients"."""
    if total <= limit - reserve:
        return []
    return [
        f"the functions may open {total} database connections (max instances x (pool + overflow): "
        f"{parts}), more than the {limit - reserve} that {origin} allows (max_connections {limit} minus "
        f"DYLEN_DB_RESERVED_CONNECTIONS {reserve}). Lower max-instances, pool or overflow in "
        "RUNTIME_SETTINGS (deploy.sh), or raise the instance's max_connections (its flag or a larger tier)"
    ]


def _number(value: Any) -> float:
    """A count, a rate or a duration ("10s", "300.000s") as a number of units."""
    return float(str(value).rstrip("s") or 0)


def queue_problems(queue: dict[str, Any], expected: dict[str, str]) -> list[str]:
    """Where the queue differs from what deploy.sh sets (a deploy updates it), and a paused queue."""
    retry = queue.get("retryConfig") or {}
    rate = queue.get("rateLimits") or {}
    actual = {
        "max-attempts": retry.get("maxAttempts"),
        "min-backoff": retry.get("minBackoff"),
        "max-backoff": retry.get("maxBackoff"),
        "max-doublings": retry.get("maxDoublings"),
        "max-dispatches-per-second": rate.get("maxDispatchesPerSecond"),
        "max-concurrent-dispatches": rate.get("maxConcurrentDispatches"),
    }
    problems = []
    for flag, value in actual.items():
        want = expected[flag]
        if value is None or _number(value) != _number(want):
            problems.append(
                f"queue --{flag} is {value if value is not None else 'unset'}, deploy.sh sets {want}"
            )
    if queue.get("state") not in (None, "RUNNING"):
        problems.append(
            f"queue is {queue.get('state')}, not RUNNING: tasks wait (gcloud tasks queues resume)"
        )
    return problems


def main(argv: list[str]) -> int:
    if len(argv) >= 6 and argv[1] == "public-access":
        mode, notes = public_access(argv[2], _load(argv[3]), _load(argv[4]), _load(argv[5]))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(mode)
        return 0
    if len(argv) == 5 and argv[1] == "instance":
        problems = instance_problems(_load(argv[2]) or {}, argv[3] == "true", argv[4])
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    if len(argv) == 9 and argv[1] == "queue":
        names = (
            "max-attempts",
            "min-backoff",
            "max-backoff",
            "max-doublings",
            "max-dispatches-per-second",
            "max-concurrent-dispatches",
        )
        problems = queue_problems(_load(argv[2]) or {}, dict(zip(names, argv[3:], strict=True)))
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    if len(argv) == 7 and argv[1] == "connections":
        # connections INSTANCE.json TOTAL PARTS RESERVE OVERRIDE ("" = read the instance)
        total, parts, reserve, override = int(argv[3]), argv[4], int(argv[5]), argv[6]
        if override:
            limit, origin = int(override), "DYLEN_DB_MAX_CONNECTIONS"
        else:
            found, origin = connection_limit(_load(argv[2]) or {})
            if found is None:
                print(
                    f"cannot tell the max_connections of {origin}: set DYLEN_DB_MAX_CONNECTIONS to its value"
                )
                return 1
            limit = found
        problems = connection_problems(total, parts, limit, origin, reserve)
        for problem in problems:
            print(problem)
        if not problems:
            print(
                f"(connection budget: at most {total} of the {limit - reserve} connections {origin} allows)"
            )
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
