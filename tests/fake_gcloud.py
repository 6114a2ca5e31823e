"""A stand-in for `gcloud` on PATH for deploy.sh's tests (Google cannot be reached from here).

It keeps a project's state in a JSON file beside it (service accounts, databases, queue, functions,
IAM bindings...), so a second deployment sees what the first made; it refuses what gcloud refuses
(creating what exists, binding a member that does not exist, updating what does not), and it can
fail a call the way gcloud does: `spec.json`'s "fail" rules name a regular expression on the
command line, an error kind (permission, orgpolicy, notfound, propagation, or a literal text) and
how many times. Every call is appended to the file `spec["calls"]` names, one line each.

tests/test_deploy.py installs it as `bin/gcloud` (run with `python -S`: no site import, a faster
start for the hundred-odd calls of a deployment).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ERRORS = {
    "permission": "PERMISSION_DENIED: Permission '{what}' denied on resource (or it may not exist).",
    "orgpolicy": (
        "FAILED_PRECONDITION: One or more users named in the policy do not belong to a permitted customer, "
        "perhaps due to an organization policy."
    ),
    "notfound": "NOT_FOUND: Requested entity was not found.",
    "propagation": "INVALID_ARGUMENT: Service account {what} does not exist.",
}


def main(args: list[str]) -> int:
    spec = json.loads((HERE / "spec.json").read_text())
    with open(spec["calls"], "a") as calls:
        calls.write(" ".join(args) + "\n")
    state_path = HERE / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else _initial(spec)
    try:
        return Gcloud(spec, state, args).run()
    finally:
        state_path.write_text(json.dumps(state))


def _initial(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "present": list(spec.get("present", [])),
        "bindings": [list(b) for b in spec.get("bindings", [])],
        "enabled": list(spec.get("enabled_apis", [])),
        "fail_counts": {},
        "queue": spec.get("queue"),
        "labels": {},
        "invoker_check_off": [],
        "sql_roles": {},
    }


class Failure(Exception):
    pass


class Gcloud:
    def __init__(self, spec: dict[str, Any], state: dict[str, Any], args: list[str]) -> None:
        self.spec, self.state, self.args = spec, state, args
        self.line = " ".join(args)
        self.words = [a for a in args if not a.startswith("-")]

    # -- helpers -----------------------------------------------------------------------------------

    def flag(self, name: str) -> str | None:
        for i, arg in enumerate(self.args):
            if arg == name and i + 1 < len(self.args):
                return self.args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None

    def error(self, text: str) -> int:
        command = "gcloud." + ".".join(self.args[:3])
        print(f"ERROR: ({command}) {text}", file=sys.stderr)
        return 1

    def injected(self) -> int | None:
        for index, rule in enumerate(self.spec.get("fail", [])):
            if not re.search(rule["match"], self.line):
                continue
            count = self.state["fail_counts"].get(str(index), 0)
            if rule.get("times") is not None and count >= rule["times"]:
                continue
            self.state["fail_counts"][str(index)] = count + 1
            kind = rule["error"]
            if kind == "orgpolicy" and self.args[:2] == ["functions", "deploy"]:
                self.present_add(f"function:{self.args[2]}")  # deployed; the allUsers binding refused
            text = ERRORS.get(kind, kind).format(what=rule.get("what", "x"))
            return self.error(text)
        return None

    def present(self, key: str) -> bool:
        return key in self.state["present"]

    def present_add(self, key: str) -> None:
        if key not in self.state["present"]:
            self.state["present"].append(key)

    def service_of(self, function: str) -> str:
        return function.lower().replace("_", "-")

    def sa_exists(self, member: str) -> bool:
        if not member.startswith("serviceAccount:"):
            return True
        return self.present("sa:" + member.split(":", 1)[1].split("@")[0])

    def bind(self, resource: str, member: str, role: str) -> int:
        if not self.sa_exists(member):
            return self.error(ERRORS["propagation"].format(what=member.split(":", 1)[1]))
        if [resource, member, role] not in self.state["bindings"]:
            self.state["bindings"].append([resource, member, role])
        print("Updated IAM policy.", file=sys.stderr)
        return 0

    def policy(self, resource: str) -> int:
        wanted = self.flag("--filter") or ""
        fmt = self.flag("--format") or ""
        for res, member, role in self.state["bindings"]:
            if res != resource:
                continue
            if wanted.startswith("bindings.role:") and role != wanted.split(":", 1)[1]:
                continue
            print(member if fmt == "value(bindings.members)" else f"{role}\t{member}")
        return 0

    # -- commands ----------------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        if a[:2] == ["config", "get-value"]:
            value = self.spec.get("config", {}).get(a[2])
            if value is None:
                print("(unset)", file=sys.stderr)
            else:
                print(value)
            return 0
        failed = self.injected()
        if failed is not None:
            return failed
        verb = next((w for w in self.words if w in VERBS), None)
        handler = getattr(self, "cmd_" + "_".join(self.words[:2]).replace("-", "_"), None)
        if handler is not None:
            return int(handler())
        key = self.key()
        if key and verb == "describe":
            if not self.present(key):
                return self.error(ERRORS["notfound"])
            print(f"name: {key.split(':', 1)[1]}")
            return 0
        if key and verb == "create":
            if self.present(key):
                return self.error(f"ALREADY_EXISTS: {key} already exists.")
            self.present_add(key)
            print(f"Created [{key}].", file=sys.stderr)
            return 0
        if key and verb in ("update", "delete"):
            if not self.present(key):
                return self.error(ERRORS["notfound"])
            if verb == "delete":
                self.state["present"].remove(key)
            return 0
        return 0

    def key(self) -> str | None:
        w = self.words
        kinds = {
            ("iam", "service-accounts"): "sa",
            ("sql", "databases"): "db",
            ("sql", "users"): "sqluser",
            ("tasks", "queues"): "queue",
            ("scheduler", "jobs"): "schedule",
            ("artifacts", "repositories"): "repo",
            ("run", "jobs"): "runjob",
        }
        kind = kinds.get((w[0], w[1])) if len(w) > 1 else None
        if kind is None:
            return None
        name = w[4] if w[1] == "jobs" and w[0] == "scheduler" and w[2] in ("create", "update") else w[3]
        return f"{kind}:{name.split('@')[0]}"

    def cmd_services_enable(self) -> int:
        for api in self.words[2:]:
            if api not in self.state["enabled"]:
                self.state["enabled"].append(api)
        return 0

    def cmd_services_list(self) -> int:
        for api in self.state["enabled"]:
            print(api)
        return 0

    def cmd_sql_instances(self) -> int:
        instance = self.spec.get("instance")
        if instance is None:
            return self.error("HTTPError 404: The Cloud SQL instance does not exist.")
        print(json.dumps(instance))
        return 0

    def cmd_sql_users(self) -> int:
        if self.words[2] == "assign-roles":
            if not self.present("sqluser:" + self.words[3].split("@")[0]):
                return self.error("HTTPError 404: The user does not exist.")
            self.state["sql_roles"][self.words[3]] = (self.flag("--database-roles") or "").split(",")
            return 0
        return self.generic()

    def cmd_org_policies_describe(self) -> int:
        constraint = self.words[2]
        policy = self.spec.get("org_policies", {}).get(constraint)
        if policy == "denied":
            return self.error(ERRORS["permission"].format(what="orgpolicy.policy.get"))
        print(json.dumps(policy if policy is not None else {"name": f"projects/1/policies/{constraint}"}))
        return 0

    def cmd_secrets_versions(self) -> int:
        secret = self.flag("--secret")
        version = self.spec.get("secret_version", "1")
        print(f"projects/123456/secrets/{secret}/versions/{version}")
        return 0

    def cmd_secrets_add_iam_policy_binding(self) -> int:
        return self.bind(f"secret:{self.words[2]}", self.flag("--member") or "", self.flag("--role") or "")

    def cmd_projects_add_iam_policy_binding(self) -> int:
        return self.bind(f"project:{self.words[2]}", self.flag("--member") or "", self.flag("--role") or "")

    def cmd_projects_get_iam_policy(self) -> int:
        return self.policy(f"project:{self.words[2]}")

    def cmd_iam_service_accounts(self) -> int:
        verb = self.words[2]
        if verb == "add-iam-policy-binding":
            target = self.words[3]
            if not self.present("sa:" + target.split("@")[0]):
                return self.error(ERRORS["propagation"].format(what=target))
            return self.bind(f"sa-policy:{target}", self.flag("--member") or "", self.flag("--role") or "")
        if verb == "get-iam-policy":
            return self.policy(f"sa-policy:{self.words[3]}")
        return self.generic()

    def cmd_tasks_queues(self) -> int:
        verb = self.words[2]
        name = self.words[3]
        if verb == "add-iam-policy-binding":
            if not self.present(f"queue:{name}"):
                return self.error(ERRORS["notfound"])
            return self.bind(f"queue:{name}", self.flag("--member") or "", self.flag("--role") or "")
        if verb == "get-iam-policy":
            return self.policy(f"queue:{name}")
        if verb in ("create", "update"):
            code = self.generic()
            if code == 0:
                self.state["queue"] = {
                    "state": "RUNNING",
                    "retryConfig": {
                        "maxAttempts": int(self.flag("--max-attempts") or 0),
                        "minBackoff": self.flag("--min-backoff"),
                        "maxBackoff": self.flag("--max-backoff"),
                        "maxDoublings": int(self.flag("--max-doublings") or 0),
                    },
                    "rateLimits": {
                        "maxDispatchesPerSecond": float(self.flag("--max-dispatches-per-second") or 0),
                        "maxConcurrentDispatches": int(self.flag("--max-concurrent-dispatches") or 0),
                    },
                }
            return code
        if verb == "describe" and self.flag("--format") == "json":
            if not self.present(f"queue:{name}"):
                return self.error(ERRORS["notfound"])
            print(json.dumps(self.state["queue"] or {}))
            return 0
        return self.generic()

    def cmd_artifacts_repositories(self) -> int:
        if self.words[2] == "add-iam-policy-binding":
            if not self.present(f"repo:{self.words[3]}"):
                return self.error(ERRORS["notfound"])
            return self.bind(f"repo:{self.words[3]}", self.flag("--member") or "", self.flag("--role") or "")
        return self.generic()

    def cmd_artifacts_docker(self) -> int:
        if not self.present(f"image:{self.words[4]}"):
            return self.error(f"Image not found: {self.words[4]}")
        return 0

    def cmd_builds_submit(self) -> int:
        image = (self.flag("--substitutions") or "").split("=", 1)[1]
        if not self.present("repo:" + image.split("/")[2]):
            return self.error(ERRORS["notfound"])
        self.present_add(f"image:{image}")
        return 0

    def cmd_run_jobs(self) -> int:
        verb, name = self.words[2], self.words[3]
        if verb == "deploy":
            if not self.sa_exists("serviceAccount:" + (self.flag("--service-account") or "")):
                return self.error(ERRORS["propagation"].format(what=self.flag("--service-account")))
            if not self.present(f"image:{self.flag('--image')}"):
                return self.error(f"Image '{self.flag('--image')}' not found.")
            self.present_add(f"runjob:{name}")
            return 0
        if verb == "execute":
            if not self.present(f"runjob:{name}"):
                return self.error(f"Cannot find job [{name}].")
            return 0
        return self.generic()

    def cmd_logging_read(self) -> int:
        for line in reversed(self.spec.get("logs", [])):  # newest first, as gcloud reads them
            print(line)
        return 0

    def cmd_functions_deploy(self) -> int:
        name = self.words[2]
        account = self.flag("--service-account") or ""
        if not self.sa_exists("serviceAccount:" + account):
            return self.error(ERRORS["propagation"].format(what=account))
        self.present_add(f"function:{name}")
        self.state["labels"][name] = self.flag("--update-labels")
        service = f"run:{self.service_of(name)}"
        if "--allow-unauthenticated" in self.args:
            self.bind(service, "allUsers", "roles/run.invoker")
        elif "--no-allow-unauthenticated" in self.args:
            binding = [service, "allUsers", "roles/run.invoker"]
            if binding in self.state["bindings"]:
                self.state["bindings"].remove(binding)
        return 0

    def cmd_functions_describe(self) -> int:
        name = self.words[2]
        if not self.present(f"function:{name}"):
            return self.error(f"ResponseError: status=[404], message=[Function {name} does not exist]")
        print(
            f"projects/{self.flag('--project')}/locations/{self.flag('--region')}/services/{self.service_of(name)}"
        )
        return 0

    def cmd_functions_add_invoker_policy_binding(self) -> int:
        name = self.words[2]
        if not self.present(f"function:{name}"):
            return self.error(f"ResponseError: status=[404], message=[Function {name} does not exist]")
        return self.bind(f"run:{self.service_of(name)}", self.flag("--member") or "", "roles/run.invoker")

    def cmd_functions_remove_invoker_policy_binding(self) -> int:
        binding = [f"run:{self.service_of(self.words[2])}", self.flag("--member"), "roles/run.invoker"]
        if binding in self.state["bindings"]:
            self.state["bindings"].remove(binding)
        return 0

    def cmd_functions_list(self) -> int:
        wanted = (self.flag("--filter") or "").removeprefix("labels.")
        for key in self.state["present"]:
            if key.startswith("function:") and self.state["labels"].get(key[9:]) == wanted:
                print(
                    f"projects/{self.flag('--project')}/locations/{self.flag('--regions')}/functions/{key[9:]}"
                )
        return 0

    def cmd_functions_delete(self) -> int:
        key = f"function:{self.words[2]}"
        if not self.present(key):
            return self.error(ERRORS["notfound"])
        self.state["present"].remove(key)
        return 0

    def cmd_run_services(self) -> int:
        verb, service = self.words[2], self.words[3]
        if verb == "update" and "--no-invoker-iam-check" in self.args:
            if not self._function_of(service):
                return self.error(f"Cannot find service [{service}].")
            if service not in self.state["invoker_check_off"]:
                self.state["invoker_check_off"].append(service)
            return 0
        if verb == "get-iam-policy":
            return self.policy(f"run:{service}")
        return 0

    def _function_of(self, service: str) -> str:
        for key in self.state["present"]:
            if key.startswith("function:") and self.service_of(key[9:]) == service:
                return key[9:]
        return ""

    def cmd_scheduler_jobs(self) -> int:
        if self.words[2] == "list":
            for key in self.state["present"]:
                if key.startswith("schedule:"):
                    print(
                        f"projects/{self.flag('--project')}/locations/{self.flag('--location')}/jobs/{key[9:]}"
                    )
            return 0
        if self.words[2] == "create" and not self.sa_exists(
            "serviceAccount:" + (self.flag("--oidc-service-account-email") or "")
        ):
            return self.error(ERRORS["propagation"].format(what=self.flag("--oidc-service-account-email")))
        return self.generic()

    def generic(self) -> int:
        key = self.key()
        verb = self.words[2]
        if key is None:
            return 0
        if verb == "describe":
            return 0 if self.present(key) else self.error(ERRORS["notfound"])
        if verb == "create":
            if self.present(key):
                return self.error(f"ALREADY_EXISTS: {key} already exists.")
            self.present_add(key)
            return 0
        if verb in ("update", "delete"):
            if not self.present(key):
                return self.error(ERRORS["notfound"])
            if verb == "delete":
                self.state["present"].remove(key)
        return 0


VERBS = ("describe", "create", "update", "delete")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
