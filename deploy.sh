#!/usr/bin/env bash
# deploy.sh: deploy dylen-jobs to Google Cloud (docs/DEPLOYMENT.md is the guide). In order: APIs; a
# preflight that only reads (the Cloud SQL instance, the secret's version, the organisation policies
# on public access) and stops before any change if the project cannot take the deployment; service
# accounts; IAM; the Artifact Registry repository; the database and its users; the Cloud Tasks queue;
# the migrations, run inside Google Cloud as a Cloud Run job; every function under functions/ (staged
# into build/<name>/ with a copy of common/); invokers; Cloud Scheduler jobs; with --prune, what the
# repository no longer has. Every step describes before it creates, so running it twice is safe.
set -euo pipefail

#   ./deploy.sh --project P --region R --sql-instance P:R:I [--dry-run | --check] [--prune] [...]
#   ./deploy.sh --help

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Who calls each function. Functions not listed are user-facing: public, because they verify
# Firebase ID tokens themselves. Listed ones are --no-allow-unauthenticated and only their caller
# gets roles/run.invoker; the dashboard's callers are the people on DYLEN_DASHBOARD_OPERATORS (it
# checks that list itself too).
#   function          caller
TASK_FUNCTIONS=(
  "process_job       tasks"
  "archive_lessons   scheduler"
  "rescue_jobs       scheduler"
  "dashboard         operators"
)
# Cloud Scheduler jobs (time zone Etc/UTC), created only for functions whose folder exists.
#   function          schedule
SCHEDULES=(
  "archive_lessons   0 1 * * *"
  "rescue_jobs       */5 * * * *"
)
# Identities, one service account per role (names: DYLEN_<ROLE>_SA_NAME):
#   api        dylen-api        the user functions (read and create jobs)   database, enqueue on the queue
#   worker     dylen-worker     process_job                                 database, enqueue on the queue
#   cron       dylen-cron       archive_lessons, rescue_jobs                database, enqueue on the queue
#   dashboard  dylen-dashboard  dashboard (its retries dispatch)            database, enqueue on the queue
#   migrate    dylen-migrate    the migration job                           database as cloudsqlsuperuser
#   build      dylen-build      Cloud Build, for functions and job image    roles/cloudbuild.builds.builder
#   tasks      dylen-tasks      the identity in Cloud Tasks' OIDC tokens    run.invoker on process_job
#   scheduler  dylen-scheduler  the identity in Cloud Scheduler's tokens    run.invoker on scheduled ones
# The four runtime roles may act as dylen-tasks (a task carries its OIDC token).

usage() {
  cat <<'EOF'
Usage: ./deploy.sh [options]

Each option can also come from the environment variable named after it. Required: --project,
--region, --sql-instance; the project and region default to gcloud's own configuration
(`gcloud config get-value project`, `gcloud config get-value functions/region`).

  --project ID             DYLEN_GCP_PROJECT          Google Cloud project
  --region REGION          DYLEN_GCP_REGION           region of functions, job, queue, scheduler jobs
  --sql-instance P:R:I     DYLEN_CLOUD_SQL_INSTANCE   Cloud SQL instance connection name
  --db-name NAME           DYLEN_DB_NAME              database (default: dylen)
  --db-ip-type TYPE        DYLEN_DB_IP_TYPE           public (default), private or psc: how the
                                                      functions and the migration job reach the instance
  --vpc-connector NAME     DYLEN_VPC_CONNECTOR        Serverless VPC Access connector for the functions
                                                      and the migration job (needed with private / psc)
  --db-password-secret S   DYLEN_DB_PASSWORD_SECRET   Secret Manager secret holding the database
                                                      password; without it IAM database auth is used
  --db-password-secret-version N
                           DYLEN_DB_PASSWORD_SECRET_VERSION   version to pin (default: the latest at
                                                      deploy time, recorded in build/deploy-record.txt)
  --db-user USER           DYLEN_DB_USER              password auth's database user (default: dylen;
                                                      create it with gcloud sql users create)
  --queue NAME             DYLEN_TASKS_QUEUE          Cloud Tasks queue id (default: dylen-jobs)
  --firebase-project ID    DYLEN_FIREBASE_PROJECT_ID  Firebase project of user tokens (default: --project)
  --public-access MODE     DYLEN_PUBLIC_ACCESS        how the user-facing functions are made public:
                                                      auto (default: all-users unless an organisation
                                                      policy refuses allUsers), all-users, or
                                                      no-invoker-iam-check (Cloud Run's invoker check off)
  --build-dir DIR          DYLEN_BUILD_DIR            staging folder (default: build)
  --dry-run                print every command a real run would run with these inputs (on a project
                           where nothing exists yet), run none
  --check                  verify the project (APIs, identities, roles, instance, queue, policies) and
                           print what is missing; changes nothing (exit 1 if anything is)
  --prune                  also remove what the repository no longer has: invokers not listed,
                           scheduler jobs and functions (labelled managed-by=dylen-deploy) of removed
                           folders
  --stage-only             only stage build/<name>/ folders (no gcloud, no network)
  --skip-migrations        do not build or run the migration job
  -h, --help               this text

Tuning (environment only): DYLEN_JOB_MAX_ATTEMPTS (5), DYLEN_JOB_TIMEOUT_SECONDS (600, clamped to 15-1800),
DYLEN_QUEUE_MAX_ATTEMPTS (20: the queue redelivers only what process_job could not record),
DYLEN_QUEUE_MIN_BACKOFF (10s), DYLEN_QUEUE_MAX_BACKOFF (300s), DYLEN_QUEUE_MAX_DOUBLINGS (4),
DYLEN_QUEUE_MAX_DISPATCHES_PER_SECOND (10), DYLEN_QUEUE_MAX_CONCURRENT_DISPATCHES (20),
DYLEN_MIGRATE_WAIT_SECONDS (600: how long the migration job waits for IAM to let it in),
DYLEN_DEPLOY_RETRIES (8) and DYLEN_DEPLOY_RETRY_SECONDS (15: bounded retries while IAM propagates),
DYLEN_ARTIFACT_REPO (dylen), service account names DYLEN_API_SA_NAME (dylen-api),
DYLEN_WORKER_SA_NAME (dylen-worker), DYLEN_CRON_SA_NAME (dylen-cron), DYLEN_DASHBOARD_SA_NAME
(dylen-dashboard), DYLEN_MIGRATE_SA_NAME (dylen-migrate), DYLEN_BUILD_SA_NAME (dylen-build),
DYLEN_INVOKER_SA_NAME (dylen-tasks), DYLEN_SCHEDULER_SA_NAME (dylen-scheduler); PYTHON (python3,
to read gcloud's JSON).
Passed through to the functions when set: DYLEN_TIER_HISTORY_LIMITS, DYLEN_TIER_DAILY_JOBS,
DYLEN_TIER_ACTIVE_JOBS, DYLEN_TIER_DAILY_TOKENS, DYLEN_TIER_CONCURRENT_CALLS,
DYLEN_RESCUE_AFTER_SECONDS, DYLEN_LESSON_GENERATOR, DYLEN_LOG_LEVEL, DYLEN_DASHBOARD_AUDIENCE,
DYLEN_TRACE_SAMPLE_RATIO, DYLEN_METRICS_EXPORT_SECONDS, and
the model calls' DYLEN_GEMINI_MODEL, DYLEN_GEMINI_VERTEX_PROJECT, DYLEN_GEMINI_VERTEX_LOCATION,
DYLEN_GEMINI_BASE_URL, DYLEN_GEMINI_TIMEOUT_SECONDS, DYLEN_MODEL_LIMITS, DYLEN_MODEL_PRICES,
DYLEN_MODEL_SLOT_WAIT_SECONDS, DYLEN_MODEL_CALL_BODIES, DYLEN_MODEL_CALL_RETENTION_DAYS.
Telemetry: DYLEN_TELEMETRY (gcp: traces to Cloud Trace, metrics to Cloud Monitoring; off turns it off).
Dashboard: DYLEN_DASHBOARD_OPERATORS (comma-separated Google accounts) get roles/run.invoker on the
dashboard function and are the only e-mails it lets in; without it the dashboard refuses everyone.
EOF
}

die() {
  echo "deploy.sh: error: $*" >&2
  exit 2
}

PROJECT="${DYLEN_GCP_PROJECT:-}"
REGION="${DYLEN_GCP_REGION:-}"
SQL_INSTANCE="${DYLEN_CLOUD_SQL_INSTANCE:-}"
DB_NAME="${DYLEN_DB_NAME:-dylen}"
DB_USER="${DYLEN_DB_USER:-}"
DB_IP_TYPE="${DYLEN_DB_IP_TYPE:-public}"
VPC_CONNECTOR="${DYLEN_VPC_CONNECTOR:-}"
DB_PASSWORD_SECRET="${DYLEN_DB_PASSWORD_SECRET:-}"
DB_PASSWORD_SECRET_VERSION="${DYLEN_DB_PASSWORD_SECRET_VERSION:-}"
QUEUE="${DYLEN_TASKS_QUEUE:-dylen-jobs}"
FIREBASE_PROJECT="${DYLEN_FIREBASE_PROJECT_ID:-}"
PUBLIC_ACCESS_REQUESTED="${DYLEN_PUBLIC_ACCESS:-auto}"
BUILD_DIR="${DYLEN_BUILD_DIR:-build}"
DRY_RUN=0
CHECK=0
PRUNE=0
STAGE_ONLY=0
SKIP_MIGRATIONS=0

need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --region) need_value "$@"; REGION="$2"; shift 2 ;;
    --sql-instance) need_value "$@"; SQL_INSTANCE="$2"; shift 2 ;;
    --db-name) need_value "$@"; DB_NAME="$2"; shift 2 ;;
    --db-user) need_value "$@"; DB_USER="$2"; shift 2 ;;
    --db-ip-type) need_value "$@"; DB_IP_TYPE="$2"; shift 2 ;;
    --vpc-connector) need_value "$@"; VPC_CONNECTOR="$2"; shift 2 ;;
    --db-password-secret) need_value "$@"; DB_PASSWORD_SECRET="$2"; shift 2 ;;
    --db-password-secret-version) need_value "$@"; DB_PASSWORD_SECRET_VERSION="$2"; shift 2 ;;
    --queue) need_value "$@"; QUEUE="$2"; shift 2 ;;
    --firebase-project) need_value "$@"; FIREBASE_PROJECT="$2"; shift 2 ;;
    --public-access) need_value "$@"; PUBLIC_ACCESS_REQUESTED="$2"; shift 2 ;;
    --build-dir) need_value "$@"; BUILD_DIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --check) CHECK=1; shift ;;
    --prune) PRUNE=1; shift ;;
    --stage-only) STAGE_ONLY=1; shift ;;
    --skip-migrations) SKIP_MIGRATIONS=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

MAX_ATTEMPTS="${DYLEN_JOB_MAX_ATTEMPTS:-5}"
JOB_TIMEOUT="${DYLEN_JOB_TIMEOUT_SECONDS:-600}"
# The queue's retries are the crash safety net only (docs/DEPLOYMENT.md, "The queue"): process_job
# answers 2xx for every outcome it records and schedules its own retries, so Cloud Tasks redelivers
# a task only when nothing could be recorded (database unavailable, the instance died mid-request).
QUEUE_MAX_ATTEMPTS="${DYLEN_QUEUE_MAX_ATTEMPTS:-20}"
MIN_BACKOFF="${DYLEN_QUEUE_MIN_BACKOFF:-10s}"
MAX_BACKOFF="${DYLEN_QUEUE_MAX_BACKOFF:-300s}"
MAX_DOUBLINGS="${DYLEN_QUEUE_MAX_DOUBLINGS:-4}"
MAX_DISPATCHES_PER_SECOND="${DYLEN_QUEUE_MAX_DISPATCHES_PER_SECOND:-10}"
MAX_CONCURRENT_DISPATCHES="${DYLEN_QUEUE_MAX_CONCURRENT_DISPATCHES:-20}"
MIGRATE_WAIT="${DYLEN_MIGRATE_WAIT_SECONDS:-600}"
RETRIES="${DYLEN_DEPLOY_RETRIES:-8}"
RETRY_SECONDS="${DYLEN_DEPLOY_RETRY_SECONDS:-15}"
ARTIFACT_REPO="${DYLEN_ARTIFACT_REPO:-dylen}"
API_SA_NAME="${DYLEN_API_SA_NAME:-dylen-api}"
WORKER_SA_NAME="${DYLEN_WORKER_SA_NAME:-dylen-worker}"
CRON_SA_NAME="${DYLEN_CRON_SA_NAME:-dylen-cron}"
DASHBOARD_SA_NAME="${DYLEN_DASHBOARD_SA_NAME:-dylen-dashboard}"
MIGRATE_SA_NAME="${DYLEN_MIGRATE_SA_NAME:-dylen-migrate}"
BUILD_SA_NAME="${DYLEN_BUILD_SA_NAME:-dylen-build}"
INVOKER_SA_NAME="${DYLEN_INVOKER_SA_NAME:-dylen-tasks}"
SCHEDULER_SA_NAME="${DYLEN_SCHEDULER_SA_NAME:-dylen-scheduler}"
MIGRATE_JOB=dylen-migrate
# Labels the functions this script deploys, so that --prune deletes only its own.
MANAGED_LABEL="managed-by=dylen-deploy"

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
if ! is_int "$MAX_ATTEMPTS" || ((MAX_ATTEMPTS < 1 || MAX_ATTEMPTS > 100)); then
  die "DYLEN_JOB_MAX_ATTEMPTS must be an integer from 1 to 100, got '$MAX_ATTEMPTS'"
fi
if ! is_int "$JOB_TIMEOUT" || ((JOB_TIMEOUT < 1)); then
  die "DYLEN_JOB_TIMEOUT_SECONDS must be a positive integer, got '$JOB_TIMEOUT'"
fi
if ! is_int "$QUEUE_MAX_ATTEMPTS" || ((QUEUE_MAX_ATTEMPTS < 1 || QUEUE_MAX_ATTEMPTS > 1000)); then
  die "DYLEN_QUEUE_MAX_ATTEMPTS must be an integer from 1 to 1000, got '$QUEUE_MAX_ATTEMPTS'"
fi
is_int "$MAX_DOUBLINGS" || die "DYLEN_QUEUE_MAX_DOUBLINGS must be an integer, got '$MAX_DOUBLINGS'"
[[ "$MIN_BACKOFF" =~ ^[0-9.]+s$ ]] || die "DYLEN_QUEUE_MIN_BACKOFF must look like 10s, got '$MIN_BACKOFF'"
[[ "$MAX_BACKOFF" =~ ^[0-9.]+s$ ]] || die "DYLEN_QUEUE_MAX_BACKOFF must look like 300s, got '$MAX_BACKOFF'"
is_int "$MIGRATE_WAIT" || die "DYLEN_MIGRATE_WAIT_SECONDS must be an integer, got '$MIGRATE_WAIT'"
if ! is_int "$RETRIES" || ((RETRIES < 1)); then
  die "DYLEN_DEPLOY_RETRIES must be a positive integer, got '$RETRIES'"
fi
is_int "$RETRY_SECONDS" || die "DYLEN_DEPLOY_RETRY_SECONDS must be an integer, got '$RETRY_SECONDS'"
is_int "${DYLEN_DB_RESERVED_CONNECTIONS:-10}" \
  || die "DYLEN_DB_RESERVED_CONNECTIONS must be an integer, got '${DYLEN_DB_RESERVED_CONNECTIONS}'"
[[ -z "${DYLEN_DB_MAX_CONNECTIONS:-}" ]] || is_int "$DYLEN_DB_MAX_CONNECTIONS" \
  || die "DYLEN_DB_MAX_CONNECTIONS must be an integer, got '${DYLEN_DB_MAX_CONNECTIONS}'"
case "$DB_IP_TYPE" in public | private | psc) ;; *) die "--db-ip-type must be public, private or psc, got '$DB_IP_TYPE'" ;; esac
case "$PUBLIC_ACCESS_REQUESTED" in
  auto | all-users | no-invoker-iam-check) ;;
  *) die "--public-access must be auto, all-users or no-invoker-iam-check, got '$PUBLIC_ACCESS_REQUESTED'" ;;
esac
if [[ "$DB_IP_TYPE" != public && -z "$VPC_CONNECTOR" ]]; then
  die "--db-ip-type $DB_IP_TYPE needs --vpc-connector (the functions and the migration job reach the instance over VPC)"
fi
[[ -z "$DB_PASSWORD_SECRET_VERSION" || -n "$DB_PASSWORD_SECRET" ]] \
  || die "--db-password-secret-version needs --db-password-secret"
[[ -z "$DB_PASSWORD_SECRET_VERSION" ]] || is_int "$DB_PASSWORD_SECRET_VERSION" \
  || die "--db-password-secret-version must be a version number, got '$DB_PASSWORD_SECRET_VERSION'"
((DRY_RUN + CHECK + STAGE_ONLY <= 1)) || die "--dry-run, --check and --stage-only exclude each other"

# Cloud Tasks accepts HTTP dispatch deadlines of 15 s to 30 min (common/jobs/dispatch/cloud_tasks.py clamps the
# same way); process_job's request timeout matches it, so neither side cuts the other off.
DEADLINE=$((JOB_TIMEOUT < 15 ? 15 : (JOB_TIMEOUT > 1800 ? 1800 : JOB_TIMEOUT)))
# The job's lease is its timeout: a lease longer than the request may live would let a dead
# attempt hold its job past the request's end, a shorter one would let a live attempt lose it.
if ((JOB_TIMEOUT != DEADLINE)); then
  echo "note: DYLEN_JOB_TIMEOUT_SECONDS=$JOB_TIMEOUT is outside the 15-1800 s a Cloud Tasks HTTP task may run; the functions get $DEADLINE" >&2
  JOB_TIMEOUT=$DEADLINE
fi

FUNCTIONS=()
for dir in "$ROOT"/functions/*/; do
  [[ -f "${dir}main.py" ]] && FUNCTIONS+=("$(basename "$dir")")
done
[[ ${#FUNCTIONS[@]} -gt 0 ]] || die "no functions/<name>/main.py found under $ROOT"

# Per-function instance settings (docs/DEPLOYMENT.md, step 9, "Functions"): gunicorn threads,
# pool size / overflow, Cloud Run concurrency, max instances. Concurrency above 1 needs a whole vCPU.
#   function          THREADS pool overflow concurrency max-instances
RUNTIME_SETTINGS=(
  "create_job        2 2 2 8 5"
  "process_job       4 4 2 4 5"
  "archive_lessons   1 1 1 1 1"
  "rescue_jobs       1 1 1 1 1"
  "dashboard         4 2 1 4 2"
  "*                 2 2 2 8 3"
)

runtime_of() {
  local entry name rest
  for entry in "${RUNTIME_SETTINGS[@]}"; do
    read -r name rest <<<"$entry"
    if [[ "$name" == "$1" || "$name" == "*" ]]; then
      echo "$rest"
      return
    fi
  done
}

caller_of() {
  local entry name caller
  for entry in "${TASK_FUNCTIONS[@]}"; do
    read -r name caller <<<"$entry"
    if [[ "$name" == "$1" ]]; then
      echo "$caller"
      return
    fi
  done
  echo user
}

# The runtime role (and so the service account) a function runs as.
role_of() {
  case "$(caller_of "$1")" in
    tasks) echo worker ;;
    scheduler) echo cron ;;
    operators) echo dashboard ;;
    *) echo api ;;
  esac
}

sa_name_of() {
  case "$1" in
    api) echo "$API_SA_NAME" ;;
    worker) echo "$WORKER_SA_NAME" ;;
    cron) echo "$CRON_SA_NAME" ;;
    dashboard) echo "$DASHBOARD_SA_NAME" ;;
    migrate) echo "$MIGRATE_SA_NAME" ;;
    build) echo "$BUILD_SA_NAME" ;;
    tasks) echo "$INVOKER_SA_NAME" ;;
    scheduler) echo "$SCHEDULER_SA_NAME" ;;
  esac
}

has_function() {
  [[ -f "$ROOT/functions/$1/main.py" ]]
}

# The runtime roles the functions present need, in a fixed order.
RUNTIME_ROLES=()
for role in api worker cron dashboard; do
  for name in "${FUNCTIONS[@]}"; do
    if [[ "$(role_of "$name")" == "$role" ]]; then
      RUNTIME_ROLES+=("$role")
      break
    fi
  done
done

# --- running commands ----------------------------------------------------------------------------

ERR_FILE="$(mktemp)"
OUT_FILE="$(mktemp)"
trap 'rm -f "$ERR_FILE" "$OUT_FILE"' EXIT
# A prompt would wait for an answer nobody types, or take a default that cancels the deploy.
export CLOUDSDK_CORE_DISABLE_PROMPTS=1
# Set to 1 once this run created a service account: until IAM settles, a permission that was just
# granted can still be refused to the commands that act as it (builds, deploys).
FRESH_IDENTITIES=0
# Narrow on purpose: a refusal that is not propagation (a build error, a bad flag) should stop the
# run at once, not be repeated for minutes.
PROPAGATION_RE='does not exist|[Ss]ervice account .*not found|concurrent policy changes|ABORTED|[Pp]ropagat|UNAVAILABLE|try again'
PERMISSION_RE='PERMISSION_DENIED|[Pp]ermission .*denied|does not have .*(permission|access)'
NOT_FOUND_RE='NOT_FOUND|[Nn]ot [Ff]ound|404|does not exist|[Cc]annot find'

print_cmd() {
  printf '+'
  printf ' %q' "$@"
}

# Run a command, its stderr shown and kept in ERR_FILE (to tell why it failed); its status returned.
capture() {
  local status
  set +e
  { "$@" 2>&1 1>&3 3>&- | tee "$ERR_FILE" >&2; } 3>&1
  status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

# Run a command (printed first, shell-quoted so it can be pasted) unless --dry-run. A gcloud command
# refused while IAM propagates (an account "does not exist" yet, concurrent policy changes; and, with
# AS_IDENTITY=1 in a run that created accounts, a permission just granted) is retried, bounded:
# DYLEN_DEPLOY_RETRIES attempts, DYLEN_DEPLOY_RETRY_SECONDS x attempt apart. Returns its status.
attempt() {
  print_cmd "$@"
  printf '\n'
  [[ $DRY_RUN -eq 0 ]] || return 0
  local try=1 status
  while true; do
    if capture "$@"; then
      return 0
    else
      status=$?
    fi
    [[ "$1" == gcloud ]] || return "$status"
    if ((try >= RETRIES)); then
      ((RETRIES == 1)) || echo "deploy.sh: still failing after $RETRIES attempts" >&2
      return "$status"
    fi
    if grep -Eq "$PROPAGATION_RE" "$ERR_FILE"; then
      :
    elif [[ "${AS_IDENTITY:-0}" == 1 && $FRESH_IDENTITIES -eq 1 ]] && grep -Eq "$PERMISSION_RE" "$ERR_FILE"; then
      :
    else
      return "$status"
    fi
    echo "deploy.sh: attempt $try of $RETRIES refused while IAM propagates; retrying in $((RETRY_SECONDS * try))s" >&2
    sleep $((RETRY_SECONDS * try))
    try=$((try + 1))
  done
}

run() {
  attempt "$@" || die "this step failed (gcloud's error is above): $(printf '%q ' "${@:1:4}")..." \
    "Nothing after it ran; fix the cause and run deploy.sh again (every step is safe to repeat)."
}

# Does a resource exist? Its describe command is printed, then run quietly: success means yes,
# a not-found error means no, and any other error (a permission, a disabled API) stops the
# deployment, since guessing "absent" would try to create what may well exist. Under --dry-run
# it answers "no", as on a project where nothing exists yet.
exists() {
  print_cmd "$@"
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '  # dry run: assumed absent\n'
    return 1
  fi
  if "$@" >/dev/null 2>"$ERR_FILE"; then
    printf '  # exists\n'
    return 0
  fi
  if grep -Eq "$NOT_FOUND_RE" "$ERR_FILE"; then
    printf '  # absent\n'
    return 1
  fi
  cat "$ERR_FILE" >&2
  die "cannot tell whether it exists (gcloud's error is above): $(printf '%q ' "$@")"
}

# After a create: wait, bounded, until the resource can be described (a service account, for one,
# is not visible everywhere at once).
wait_until_exists() {
  print_cmd "$@"
  printf '  # waits until it exists\n'
  [[ $DRY_RUN -eq 0 ]] || return 0
  local try=1
  until "$@" >/dev/null 2>"$ERR_FILE"; do
    if ((try >= RETRIES)); then
      cat "$ERR_FILE" >&2
      die "created, but still not visible after $RETRIES attempts: $(printf '%q ' "$@")"
    fi
    echo "deploy.sh: not visible yet (attempt $try of $RETRIES); checking again in $((RETRY_SECONDS * try))s" >&2
    sleep $((RETRY_SECONDS * try))
    try=$((try + 1))
  done
}

# Read something with a command (printed first) into OUT_FILE, its errors into ERR_FILE. Under
# --dry-run the command is not run and OUT_FILE gets $1, what a project where nothing exists yet
# gives, described by $2.
read_value() {
  local assumed="$1" description="$2"
  shift 2
  print_cmd "$@"
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '  # dry run: assumed %s\n' "$description"
    printf '%s\n' "$assumed" >"$OUT_FILE"
    return 0
  fi
  printf '\n'
  "$@" >"$OUT_FILE" 2>"$ERR_FILE"
}

stage() {
  local name="$1" dest="$BUILD_DIR/$1"
  run rm -rf "$dest"
  run mkdir -p "$dest"
  run cp "$ROOT/functions/$name/main.py" "$dest/main.py"
  # A real copy: Cloud Build uploads the folder as it is, and symlinks out of it do not travel.
  run cp -R "$ROOT/common" "$dest/common"
  run find "$dest/common" -name __pycache__ -type d -prune -exec rm -rf {} +
  run cp "$ROOT/requirements.txt" "$dest/requirements.txt"
  write_file "$dest/.gcloudignore" '# Generated by deploy.sh' '__pycache__/' '*.pyc' '.env' '.venv/'
}

write_file() {
  local path="$1"
  shift
  if [[ $DRY_RUN -eq 0 ]]; then
    printf '%s\n' "$@" >"$path"
  fi
  echo "+ write $path"
}

# The migration job's image: common/ and migrations/ on Python 3.12 (the functions' runtime), its
# entry point the operator command `python -m common.cli`; the job gives it `migrate ...`.
DOCKERFILE=(
  '# Generated by deploy.sh: the migration job (python -m common.cli migrate).'
  'FROM python:3.12-slim'
  'ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1'
  'WORKDIR /app'
  'COPY requirements.txt .'
  'RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt'
  'COPY common ./common'
  'COPY migrations ./migrations'
  'USER nobody'
  'ENTRYPOINT ["python", "-m", "common.cli"]'
  'CMD ["migrate"]'
)
# Built by the build service account; a user-chosen build account must log to Cloud Logging only.
# shellcheck disable=SC2016 # $_IMAGE is Cloud Build's substitution, not the shell's
CLOUDBUILD=(
  '# Generated by deploy.sh'
  'steps:'
  '  - name: gcr.io/cloud-builders/docker'
  '    args: ["build", "--tag", "$_IMAGE", "."]'
  'images: ["$_IMAGE"]'
  'options:'
  '  logging: CLOUD_LOGGING_ONLY'
)

stage_migrations() {
  local dest="$BUILD_DIR/$MIGRATE_JOB"
  run rm -rf "$dest"
  run mkdir -p "$dest"
  run cp -R "$ROOT/common" "$dest/common"
  run cp -R "$ROOT/migrations" "$dest/migrations"
  run find "$dest" -name __pycache__ -type d -prune -exec rm -rf {} +
  run cp "$ROOT/requirements.txt" "$dest/requirements.txt"
  write_file "$dest/Dockerfile" "${DOCKERFILE[@]}"
  write_file "$dest/cloudbuild.yaml" "${CLOUDBUILD[@]}"
  write_file "$dest/.gcloudignore" '# Generated by deploy.sh' '__pycache__/' '*.pyc' '.env'
}

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi
}

# The image tag: a digest of what goes into the image, so an unchanged image is not built again and
# a dry run names the same image as the real run.
image_tag() {
  {
    (
      cd "$ROOT"
      find common migrations requirements.txt -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
        | LC_ALL=C sort | while read -r file; do
        printf '%s\n' "$file"
        sha256 <"$file"
      done
    )
    printf '%s\n' "${DOCKERFILE[@]}" "${CLOUDBUILD[@]}"
  } | sha256 | cut -c1-16
}

if [[ $STAGE_ONLY -eq 1 ]]; then
  for name in "${FUNCTIONS[@]}"; do
    stage "$name"
  done
  stage_migrations
  echo "Staged ${#FUNCTIONS[@]} functions and the migration job in $BUILD_DIR: ${FUNCTIONS[*]} $MIGRATE_JOB"
  exit 0
fi

# Defaults from gcloud's own configuration, as Google's samples use them. Reading it is local (no
# API call), so a dry run reads it too.
gcloud_config() {
  command -v gcloud >/dev/null 2>&1 || return 0
  gcloud config get-value "$1" 2>/dev/null || true
}
if [[ -z "$PROJECT" ]]; then
  PROJECT="$(gcloud_config project)"
  [[ -z "$PROJECT" ]] || echo "(project $PROJECT: from gcloud config)"
fi
if [[ -z "$REGION" ]]; then
  REGION="$(gcloud_config functions/region)"
  [[ -z "$REGION" ]] || echo "(region $REGION: from gcloud config functions/region)"
fi
[[ -n "$PROJECT" ]] || die "--project (or DYLEN_GCP_PROJECT) is required (or set gcloud's: gcloud config set project ID)"
[[ -n "$REGION" ]] || die "--region (or DYLEN_GCP_REGION) is required (or set gcloud's: gcloud config set functions/region REGION)"
[[ -n "$SQL_INSTANCE" ]] || die "--sql-instance (or DYLEN_CLOUD_SQL_INSTANCE) is required"
[[ "$SQL_INSTANCE" =~ ^[^:]+:[^:]+:[^:]+$ ]] \
  || die "--sql-instance must be PROJECT:REGION:INSTANCE, got '$SQL_INSTANCE'"
FIREBASE_PROJECT="${FIREBASE_PROJECT:-$PROJECT}"
PY="${PYTHON:-python3}"
if [[ $DRY_RUN -eq 0 ]]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud is not on PATH (install the Google Cloud SDK)"
  command -v "$PY" >/dev/null 2>&1 || die "$PY is not on PATH (deploy.sh reads gcloud's JSON with it; set PYTHON)"
fi

sa_email() { echo "$(sa_name_of "$1")@$PROJECT.iam.gserviceaccount.com"; }
INVOKER_SA="$(sa_email tasks)"
SCHEDULER_SA="$(sa_email scheduler)"
BUILD_SA="$(sa_email build)"
MIGRATE_SA="$(sa_email migrate)"
if [[ -z "$DB_PASSWORD_SECRET" ]]; then
  DB_IAM_AUTH=true
  [[ -z "$DB_USER" ]] || die "--db-user is for password auth: with IAM database auth each role logs in as its own service account"
else
  DB_IAM_AUTH=false
  DB_USER="${DB_USER:-dylen}"
fi
# The database user a role logs in as: Cloud SQL names a service account's IAM user by its email
# without ".gserviceaccount.com"; with password auth every role shares the one user.
db_user_of() {
  if [[ "$DB_IAM_AUTH" == true ]]; then echo "$(sa_name_of "$1")@$PROJECT.iam"; else echo "$DB_USER"; fi
}
SQL_INSTANCE_NAME="${SQL_INSTANCE##*:}"
SQL_PROJECT="${SQL_INSTANCE%%:*}"
BASE_URL="https://$REGION-$PROJECT.cloudfunctions.net"
QUEUE_PATH="projects/$PROJECT/locations/$REGION/queues/$QUEUE"
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$ARTIFACT_REPO/$MIGRATE_JOB:$(image_tag)"
RECORD="$BUILD_DIR/deploy-record.txt"
G=(--project "$PROJECT")
VPC_FLAGS=()
[[ -z "$VPC_CONNECTOR" ]] || VPC_FLAGS=(--vpc-connector "$VPC_CONNECTOR")
APIS=(
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com
  cloudtasks.googleapis.com cloudscheduler.googleapis.com sqladmin.googleapis.com iam.googleapis.com
  orgpolicy.googleapis.com logging.googleapis.com
)
# Password auth: the functions and the job read the password from Secret Manager.
[[ "$DB_IAM_AUTH" == true ]] || APIS+=(secretmanager.googleapis.com)
[[ -z "$VPC_CONNECTOR" ]] || APIS+=(vpcaccess.googleapis.com)
ORG_CONSTRAINTS=(iam.allowedPolicyMemberDomains iam.managed.allowedPolicyMembers run.managed.requireInvokerIam)

# Write gcloud's JSON for each organisation constraint into $1.<n>: `{}` when gcloud finds no
# policy, nothing when it cannot read one (deploy_checks.py then says so).
read_org_policies() {
  local i=0 constraint
  for constraint in "${ORG_CONSTRAINTS[@]}"; do
    i=$((i + 1))
    if read_value '{}' "no such policy" gcloud org-policies describe "$constraint" --effective --format json "${G[@]}"; then
      cp "$OUT_FILE" "$1.$i"
    elif grep -Eq "$NOT_FOUND_RE" "$ERR_FILE"; then
      echo '{}' >"$1.$i"
    else
      sed 's/^/  /' "$ERR_FILE" >&2
      : >"$1.$i"
    fi
  done
}

# ------------------------------------------------------------------------------------------------
# --check: read the project and say what a deployment would lack. Nothing is changed.
# ------------------------------------------------------------------------------------------------
if [[ $CHECK -eq 1 ]]; then
  PROBLEMS=0
  ok() { echo "  ok       $*"; }
  missing() {
    echo "  MISSING  $*"
    PROBLEMS=$((PROBLEMS + 1))
  }
  # Members (or roles) an IAM policy read by "$@" lists, one per line, in $OUT_FILE.
  policy_lines() { "$@" >"$OUT_FILE" 2>"$ERR_FILE"; }
  # Does the resource the describe command "${@:3}" reads exist? Names it ($1) either way; $2 says
  # what to do when it does not. Any error but not-found is reported as such.
  probe() {
    local what="$1" remedy="$2"
    shift 2
    if "$@" >/dev/null 2>"$ERR_FILE"; then
      ok "$what"
    elif grep -Eq "$NOT_FOUND_RE" "$ERR_FILE"; then
      missing "$what ($remedy)"
    else
      missing "cannot tell whether $what exists: $(tail -n 1 "$ERR_FILE")"
    fi
  }
  echo "== Checking $PROJECT ($REGION) for a deployment; nothing is changed"

  echo "== APIs"
  if policy_lines gcloud services list --enabled --format 'value(config.name)' "${G[@]}"; then
    for api in "${APIS[@]}"; do
      if grep -qx "$api" "$OUT_FILE"; then ok "$api"; else missing "API $api is not enabled (a deploy enables it)"; fi
    done
  else
    missing "cannot list the enabled APIs: $(tail -n 1 "$ERR_FILE")"
  fi

  echo "== Cloud SQL instance $SQL_INSTANCE"
  if gcloud sql instances describe "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT" --format json >"$OUT_FILE" 2>"$ERR_FILE"; then
    if "$PY" "$ROOT/devtools/deploy_checks.py" instance "$OUT_FILE" "$DB_IAM_AUTH" "$DB_IP_TYPE" >"$ERR_FILE"; then
      ok "instance $SQL_INSTANCE_NAME can serve ($DB_IP_TYPE IP$([[ $DB_IAM_AUTH == true ]] && echo ', IAM database auth on'))"
    else
      while IFS= read -r line; do missing "$line (yours to fix)"; done <"$ERR_FILE"
    fi
  else
    missing "cannot read Cloud SQL instance $SQL_INSTANCE_NAME in $SQL_PROJECT (yours to create): $(tail -n 1 "$ERR_FILE")"
  fi
  probe "database $DB_NAME" "a deploy creates it" \
    gcloud sql databases describe "$DB_NAME" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"

  echo "== Identities and their roles"
  SA_ROLES=("${RUNTIME_ROLES[@]}" migrate build tasks scheduler)
  for role in "${SA_ROLES[@]}"; do
    probe "service account $(sa_email "$role")" "a deploy creates it" \
      gcloud iam service-accounts describe "$(sa_email "$role")" "${G[@]}"
  done
  SQL_ROLES=(roles/cloudsql.client)
  [[ "$DB_IAM_AUTH" == false ]] || SQL_ROLES+=(roles/cloudsql.instanceUser)
  if policy_lines gcloud projects get-iam-policy "$SQL_PROJECT" --flatten 'bindings[].members' \
    --format 'value(bindings.role,bindings.members)'; then
    for role in "${RUNTIME_ROLES[@]}" migrate; do
      for granted in "${SQL_ROLES[@]}"; do
        if grep -Eq "^${granted}[[:space:]]+serviceAccount:$(sa_email "$role")$" "$OUT_FILE"; then
          ok "$(sa_email "$role") has $granted"
        else
          missing "$(sa_email "$role") lacks $granted on project $SQL_PROJECT (a deploy grants it)"
        fi
      done
    done
  else
    missing "cannot read the IAM policy of project $SQL_PROJECT: $(tail -n 1 "$ERR_FILE")"
  fi
  if policy_lines gcloud projects get-iam-policy "$PROJECT" --flatten 'bindings[].members' \
    --format 'value(bindings.role,bindings.members)'; then
    if grep -Eq "^roles/cloudbuild.builds.builder[[:space:]]+serviceAccount:$BUILD_SA$" "$OUT_FILE"; then
      ok "$BUILD_SA has roles/cloudbuild.builds.builder"
    else
      missing "$BUILD_SA lacks roles/cloudbuild.builds.builder (a deploy grants it)"
    fi
  else
    missing "cannot read the IAM policy of project $PROJECT: $(tail -n 1 "$ERR_FILE")"
  fi
  probe "Artifact Registry repository $ARTIFACT_REPO" "a deploy creates it" \
    gcloud artifacts repositories describe "$ARTIFACT_REPO" --location "$REGION" "${G[@]}"
  if [[ "$DB_IAM_AUTH" == true ]]; then
    for role in "${RUNTIME_ROLES[@]}" migrate; do
      probe "database user $(db_user_of "$role")" "a deploy creates it" \
        gcloud sql users describe "$(db_user_of "$role")" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"
    done
  else
    if gcloud secrets versions describe "${DB_PASSWORD_SECRET_VERSION:-latest}" --secret "$DB_PASSWORD_SECRET" \
      "${G[@]}" >/dev/null 2>"$ERR_FILE"; then
      ok "secret $DB_PASSWORD_SECRET version ${DB_PASSWORD_SECRET_VERSION:-latest}"
    else
      missing "secret $DB_PASSWORD_SECRET version ${DB_PASSWORD_SECRET_VERSION:-latest} (yours to create): $(tail -n 1 "$ERR_FILE")"
    fi
  fi
  if policy_lines gcloud iam service-accounts get-iam-policy "$INVOKER_SA" --flatten 'bindings[].members' \
    --format 'value(bindings.role,bindings.members)' "${G[@]}"; then
    for role in "${RUNTIME_ROLES[@]}"; do
      if grep -Eq "^roles/iam.serviceAccountUser[[:space:]]+serviceAccount:$(sa_email "$role")$" "$OUT_FILE"; then
        ok "$(sa_email "$role") may act as $INVOKER_SA"
      else
        missing "$(sa_email "$role") may not act as $INVOKER_SA (a deploy grants roles/iam.serviceAccountUser)"
      fi
    done
  else
    missing "cannot read who may act as $INVOKER_SA: $(tail -n 1 "$ERR_FILE")"
  fi

  echo "== Cloud Tasks queue $QUEUE"
  if gcloud tasks queues describe "$QUEUE" --location "$REGION" --format json "${G[@]}" >"$OUT_FILE" 2>"$ERR_FILE"; then
    if "$PY" "$ROOT/devtools/deploy_checks.py" queue "$OUT_FILE" "$QUEUE_MAX_ATTEMPTS" "$MIN_BACKOFF" "$MAX_BACKOFF" \
      "$MAX_DOUBLINGS" "$MAX_DISPATCHES_PER_SECOND" "$MAX_CONCURRENT_DISPATCHES" >"$ERR_FILE"; then
      ok "queue settings"
    else
      while IFS= read -r line; do missing "$line"; done <"$ERR_FILE"
    fi
    if policy_lines gcloud tasks queues get-iam-policy "$QUEUE" --location "$REGION" --flatten 'bindings[].members' \
      --format 'value(bindings.role,bindings.members)' "${G[@]}"; then
      for role in "${RUNTIME_ROLES[@]}"; do
        if grep -Eq "^roles/cloudtasks.enqueuer[[:space:]]+serviceAccount:$(sa_email "$role")$" "$OUT_FILE"; then
          ok "$(sa_email "$role") may enqueue on $QUEUE"
        else
          missing "$(sa_email "$role") may not enqueue on $QUEUE (a deploy grants roles/cloudtasks.enqueuer there)"
        fi
      done
    else
      missing "cannot read the queue's IAM policy: $(tail -n 1 "$ERR_FILE")"
    fi
  else
    missing "queue $QUEUE in $REGION (a deploy creates it): $(tail -n 1 "$ERR_FILE")"
  fi

  echo "== Public access to the user-facing functions"
  POLICY_FILE="$(mktemp)"
  read_org_policies "$POLICY_FILE" >/dev/null 2>&1
  if MODE="$("$PY" "$ROOT/devtools/deploy_checks.py" public-access "$PUBLIC_ACCESS_REQUESTED" \
    "$POLICY_FILE.1" "$POLICY_FILE.2" "$POLICY_FILE.3" 2>"$ERR_FILE")"; then
    ok "public access: $MODE"
    sed 's/^/           /' "$ERR_FILE"
  else
    missing "$(cat "$ERR_FILE") (yours to fix)"
  fi
  rm -f "$POLICY_FILE" "$POLICY_FILE".*

  if ((PROBLEMS == 0)); then
    echo "== Nothing missing"
    exit 0
  fi
  echo "== $PROBLEMS missing; those marked 'a deploy ...' are done by ./deploy.sh, the others are yours"
  exit 1
fi

# ------------------------------------------------------------------------------------------------
# Deploy (or, with --dry-run, print what a deployment would run).
# ------------------------------------------------------------------------------------------------
echo "== Deploying ${FUNCTIONS[*]} to $PROJECT ($REGION)"

echo "== APIs"
run gcloud services enable "${APIS[@]}" "${G[@]}"

echo "== Preflight: only reads; stops here, before any change, if the project cannot take the deployment"
if read_value '' "a RUNNABLE PostgreSQL instance that can serve" gcloud sql instances describe "$SQL_INSTANCE_NAME" \
  --project "$SQL_PROJECT" --format json; then
  if [[ $DRY_RUN -eq 0 ]] && ! "$PY" "$ROOT/devtools/deploy_checks.py" instance "$OUT_FILE" "$DB_IAM_AUTH" "$DB_IP_TYPE" >"$ERR_FILE"; then
    die "$(cat "$ERR_FILE"). Nothing was created."
  fi
  # The connection budget (docs/PERFORMANCE.md, "Connection budget"). A dry run reads no instance:
  # it checks against DYLEN_DB_MAX_CONNECTIONS when that is set.
  BUDGET_TOTAL=0 BUDGET_PARTS=""
  for name in "${FUNCTIONS[@]}"; do
    read -r _threads pool overflow _concurrency max_instances <<<"$(runtime_of "$name")"
    BUDGET_TOTAL=$((BUDGET_TOTAL + max_instances * (pool + overflow)))
    BUDGET_PARTS+="${BUDGET_PARTS:+ }$name ${max_instances}x($pool+$overflow)"
  done
  if [[ $DRY_RUN -eq 0 || -n "${DYLEN_DB_MAX_CONNECTIONS:-}" ]]; then
    "$PY" "$ROOT/devtools/deploy_checks.py" connections "$OUT_FILE" "$BUDGET_TOTAL" "$BUDGET_PARTS" \
      "${DYLEN_DB_RESERVED_CONNECTIONS:-10}" "${DYLEN_DB_MAX_CONNECTIONS:-}" >"$ERR_FILE" \
      || die "$(cat "$ERR_FILE"). Nothing was created."
    cat "$ERR_FILE"
  else
    echo "(connection budget: at most $BUDGET_TOTAL connections; set DYLEN_DB_MAX_CONNECTIONS to check it in a dry run)"
  fi
else
  cat "$ERR_FILE" >&2
  die "cannot read Cloud SQL instance $SQL_INSTANCE_NAME in project $SQL_PROJECT (gcloud's error is above); deploy.sh never creates the instance"
fi
SECRET_FLAGS=()
if [[ "$DB_IAM_AUTH" == false ]]; then
  # One version for every function and the job, recorded, until the next deploy: a rotation never
  # leaves instances on different passwords.
  if [[ -z "$DB_PASSWORD_SECRET_VERSION" ]]; then
    read_value 1 "version 1" gcloud secrets versions describe latest --secret "$DB_PASSWORD_SECRET" --format 'value(name)' "${G[@]}" || {
      cat "$ERR_FILE" >&2
      die "cannot read the latest version of secret $DB_PASSWORD_SECRET (gcloud's error is above)"
    }
    DB_PASSWORD_SECRET_VERSION="$(basename "$(cat "$OUT_FILE")")"
  fi
  is_int "$DB_PASSWORD_SECRET_VERSION" || die "secret $DB_PASSWORD_SECRET: unexpected version '$DB_PASSWORD_SECRET_VERSION'"
  echo "(secret $DB_PASSWORD_SECRET pinned to version $DB_PASSWORD_SECRET_VERSION)"
  SECRET_FLAGS=(--set-secrets "DYLEN_DB_PASSWORD=$DB_PASSWORD_SECRET:$DB_PASSWORD_SECRET_VERSION")
fi
# How the user-facing functions become public, decided before anything is deployed: stop here if
# the organisation allows neither way (or not the one asked for).
POLICY_FILE="$(mktemp)"
read_org_policies "$POLICY_FILE"
PUBLIC_ACCESS="${PUBLIC_ACCESS_REQUESTED/auto/all-users}"
if [[ $DRY_RUN -eq 0 ]]; then
  PUBLIC_ACCESS="$("$PY" "$ROOT/devtools/deploy_checks.py" public-access "$PUBLIC_ACCESS_REQUESTED" \
    "$POLICY_FILE.1" "$POLICY_FILE.2" "$POLICY_FILE.3" 2>"$ERR_FILE")" || {
    rm -f "$POLICY_FILE" "$POLICY_FILE".*
    die "$(cat "$ERR_FILE") Nothing was deployed."
  }
  sed 's/^/  /' "$ERR_FILE"
fi
rm -f "$POLICY_FILE" "$POLICY_FILE".*
echo "(public functions: $PUBLIC_ACCESS)"

echo "== Service accounts"
for role in "${RUNTIME_ROLES[@]}" migrate build tasks scheduler; do
  email="$(sa_email "$role")"
  if ! exists gcloud iam service-accounts describe "$email" "${G[@]}"; then
    run gcloud iam service-accounts create "$(sa_name_of "$role")" --display-name "dylen-jobs $role" "${G[@]}"
    wait_until_exists gcloud iam service-accounts describe "$email" "${G[@]}"
    FRESH_IDENTITIES=1
  fi
done

echo "== IAM"
for role in "${RUNTIME_ROLES[@]}" migrate; do
  member="serviceAccount:$(sa_email "$role")"
  run gcloud projects add-iam-policy-binding "$SQL_PROJECT" --member "$member" --role roles/cloudsql.client \
    --condition None
  if [[ "$DB_IAM_AUTH" == true ]]; then
    run gcloud projects add-iam-policy-binding "$SQL_PROJECT" --member "$member" \
      --role roles/cloudsql.instanceUser --condition None
  else
    run gcloud secrets add-iam-policy-binding "$DB_PASSWORD_SECRET" --member "$member" \
      --role roles/secretmanager.secretAccessor "${G[@]}"
  fi
done
for role in "${RUNTIME_ROLES[@]}"; do
  # Tasks carry an OIDC token of dylen-tasks: whoever creates them must be able to act as it.
  run gcloud iam service-accounts add-iam-policy-binding "$INVOKER_SA" --member "serviceAccount:$(sa_email "$role")" \
    --role roles/iam.serviceAccountUser "${G[@]}"
done
for role in "${RUNTIME_ROLES[@]}"; do
  # Telemetry (DYLEN_TELEMETRY=gcp): spans to Cloud Trace, metrics to Cloud Monitoring.
  for granted in roles/cloudtrace.agent roles/monitoring.metricWriter; do
    run gcloud projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$(sa_email "$role")" \
      --role "$granted" --condition None
  done
done
run gcloud projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$BUILD_SA" \
  --role roles/cloudbuild.builds.builder --condition None

echo "== Artifact Registry repository $ARTIFACT_REPO (the migration job's image)"
if ! exists gcloud artifacts repositories describe "$ARTIFACT_REPO" --location "$REGION" "${G[@]}"; then
  run gcloud artifacts repositories create "$ARTIFACT_REPO" --repository-format docker --location "$REGION" \
    --description "dylen-jobs images (deploy.sh)" "${G[@]}"
  wait_until_exists gcloud artifacts repositories describe "$ARTIFACT_REPO" --location "$REGION" "${G[@]}"
fi
run gcloud artifacts repositories add-iam-policy-binding "$ARTIFACT_REPO" --location "$REGION" \
  --member "serviceAccount:$BUILD_SA" --role roles/artifactregistry.writer "${G[@]}"

echo "== Cloud SQL database $DB_NAME on $SQL_INSTANCE_NAME"
if ! exists gcloud sql databases describe "$DB_NAME" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"; then
  run gcloud sql databases create "$DB_NAME" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"
  wait_until_exists gcloud sql databases describe "$DB_NAME" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"
fi

echo "== Cloud SQL users"
if [[ "$DB_IAM_AUTH" == true ]]; then
  for role in "${RUNTIME_ROLES[@]}" migrate; do
    user="$(db_user_of "$role")"
    if ! exists gcloud sql users describe "$user" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"; then
      run gcloud sql users create "$user" --instance "$SQL_INSTANCE_NAME" --type cloud_iam_service_account \
        --project "$SQL_PROJECT"
      wait_until_exists gcloud sql users describe "$user" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"
    fi
  done
  # The migration job creates the tables and grants the runtime users their rights: on PostgreSQL
  # 15+ that takes the database owner's rights on schema public, which cloudsqlsuperuser has.
  run gcloud sql users assign-roles "$(db_user_of migrate)" --instance "$SQL_INSTANCE_NAME" \
    --type cloud_iam_service_account --database-roles cloudsqlsuperuser --project "$SQL_PROJECT"
else
  echo "(password auth: user '$DB_USER' and secret '$DB_PASSWORD_SECRET' are yours; create the user with"
  echo " gcloud sql users create, which makes it a cloudsqlsuperuser member, so that it can migrate)"
fi

echo "== Cloud Tasks queue $QUEUE"
QUEUE_FLAGS=(
  --location "$REGION"
  --max-attempts "$QUEUE_MAX_ATTEMPTS"
  --min-backoff "$MIN_BACKOFF"
  --max-backoff "$MAX_BACKOFF"
  --max-doublings "$MAX_DOUBLINGS"
  --max-dispatches-per-second "$MAX_DISPATCHES_PER_SECOND"
  --max-concurrent-dispatches "$MAX_CONCURRENT_DISPATCHES"
  "${G[@]}"
)
if exists gcloud tasks queues describe "$QUEUE" --location "$REGION" "${G[@]}"; then
  run gcloud tasks queues update "$QUEUE" "${QUEUE_FLAGS[@]}"
else
  run gcloud tasks queues create "$QUEUE" "${QUEUE_FLAGS[@]}"
  wait_until_exists gcloud tasks queues describe "$QUEUE" --location "$REGION" "${G[@]}"
fi
# On this queue only: the runtime roles may create tasks here and nowhere else.
for role in "${RUNTIME_ROLES[@]}"; do
  run gcloud tasks queues add-iam-policy-binding "$QUEUE" --location "$REGION" \
    --member "serviceAccount:$(sa_email "$role")" --role roles/cloudtasks.enqueuer "${G[@]}"
done

echo "== Migrations: a Cloud Run job inside Google Cloud, as $MIGRATE_SA"
if [[ $SKIP_MIGRATIONS -eq 1 ]]; then
  echo "(skipped: --skip-migrations)"
else
  stage_migrations
  if ! exists gcloud artifacts docker images describe "$IMAGE" "${G[@]}"; then
    AS_IDENTITY=1 run gcloud builds submit "$BUILD_DIR/$MIGRATE_JOB" --config "$BUILD_DIR/$MIGRATE_JOB/cloudbuild.yaml" \
      --substitutions "_IMAGE=$IMAGE" --service-account "projects/$PROJECT/serviceAccounts/$BUILD_SA" \
      --region "$REGION" "${G[@]}"
  fi
  MIGRATE_ARGS="migrate,head,--wait-for-database,$MIGRATE_WAIT"
  if [[ "$DB_IAM_AUTH" == true ]]; then
    for role in "${RUNTIME_ROLES[@]}"; do MIGRATE_ARGS+=",--grant-to,$(db_user_of "$role")"; done
  fi
  MIGRATE_ENV="^|^DYLEN_CLOUD_SQL_INSTANCE=$SQL_INSTANCE|DYLEN_DB_NAME=$DB_NAME|DYLEN_DB_USER=$(db_user_of migrate)"
  MIGRATE_ENV+="|DYLEN_DB_IAM_AUTH=$DB_IAM_AUTH|DYLEN_DB_IP_TYPE=$DB_IP_TYPE"
  JOB=(
    gcloud run jobs deploy "$MIGRATE_JOB" --image "$IMAGE" --region "$REGION" --service-account "$MIGRATE_SA"
    --set-env-vars "$MIGRATE_ENV" --args "$MIGRATE_ARGS" --tasks 1 --max-retries 0
    --task-timeout "$((MIGRATE_WAIT + 1800))s" --cpu 1 --memory 512Mi
  )
  [[ ${#VPC_FLAGS[@]} -eq 0 ]] || JOB+=("${VPC_FLAGS[@]}" --vpc-egress private-ranges-only)
  JOB+=("${SECRET_FLAGS[@]}" "${G[@]}")
  AS_IDENTITY=1 run "${JOB[@]}"
  STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if ! attempt gcloud run jobs execute "$MIGRATE_JOB" --region "$REGION" --wait "${G[@]}"; then
    echo "== The migration job failed. Its last lines (Cloud Logging):" >&2
    gcloud logging read "resource.type=\"cloud_run_job\" AND resource.labels.job_name=\"$MIGRATE_JOB\" AND timestamp>=\"$STARTED\"" \
      --limit 40 --format 'value(textPayload)' "${G[@]}" 2>&1 | awk '{ line[NR] = $0 } END { for (i = NR; i > 0; i--) print "  " line[i] }' >&2 || true
    die "the migrations failed (their own error is above; all of it: gcloud run jobs executions list --job" \
      "$MIGRATE_JOB --region $REGION). No function was deployed: they still run the previous version."
  fi
fi

# Make a user-facing function public without the allUsers binding: Cloud Run's invoker IAM check
# off on its service (what Google documents for projects under domain restricted sharing). Set
# after every deploy, since a function's deploy updates its service.
open_without_iam_check() {
  local name="$1" service
  read_value "${name//_/-}" "service ${name//_/-}" gcloud functions describe "$name" --region "$REGION" \
    --format 'value(serviceConfig.service)' "${G[@]}" || {
    cat "$ERR_FILE" >&2
    die "cannot read the Cloud Run service of function $name"
  }
  service="$(basename "$(cat "$OUT_FILE")")"
  run gcloud run services update "$service" --region "$REGION" --no-invoker-iam-check "${G[@]}"
}

REFUSED_RE='do not belong to a permitted customer|allowedPolicyMemberDomains|allowedPolicyMembers'

echo "== Functions"
# Values may contain commas (tier limits), so the list uses gcloud's alternate delimiter: ^|^.
ENV_VARS="^|^DYLEN_TASK_SERVICE_PROVIDER=gcp"
add_env() { ENV_VARS+="|$1=$2"; }
add_env DYLEN_CLOUD_TASKS_QUEUE_PATH "$QUEUE_PATH"
add_env DYLEN_BASE_URL "$BASE_URL"
add_env DYLEN_PROCESS_JOB_URL "$BASE_URL/process_job"
add_env DYLEN_TASKS_INVOKER_SA "$INVOKER_SA"
add_env DYLEN_TASKS_ALLOWED_SA "$INVOKER_SA,$SCHEDULER_SA"
add_env DYLEN_AUTH_MODE firebase
add_env DYLEN_FIREBASE_PROJECT_ID "$FIREBASE_PROJECT"
add_env DYLEN_CLOUD_SQL_INSTANCE "$SQL_INSTANCE"
add_env DYLEN_DB_NAME "$DB_NAME"
add_env DYLEN_DB_IAM_AUTH "$DB_IAM_AUTH"
add_env DYLEN_DB_IP_TYPE "$DB_IP_TYPE"
add_env DYLEN_JOB_MAX_ATTEMPTS "$MAX_ATTEMPTS"
add_env DYLEN_JOB_TIMEOUT_SECONDS "$JOB_TIMEOUT"
add_env DYLEN_TELEMETRY "${DYLEN_TELEMETRY:-gcp}"
add_env GOOGLE_CLOUD_PROJECT "$PROJECT" # the logs' trace names and the telemetry exporters' project
OPERATORS="${DYLEN_DASHBOARD_OPERATORS:-}"
[[ -z "$OPERATORS" ]] || add_env DYLEN_DASHBOARD_OPERATORS "$OPERATORS"
for passthrough in DYLEN_TIER_HISTORY_LIMITS DYLEN_TIER_DAILY_JOBS DYLEN_TIER_ACTIVE_JOBS \
  DYLEN_TIER_DAILY_TOKENS DYLEN_TIER_CONCURRENT_CALLS \
  DYLEN_RESCUE_AFTER_SECONDS DYLEN_LESSON_GENERATOR DYLEN_LOG_LEVEL DYLEN_DASHBOARD_AUDIENCE \
  DYLEN_TRACE_SAMPLE_RATIO DYLEN_METRICS_EXPORT_SECONDS \
  DYLEN_GEMINI_MODEL DYLEN_GEMINI_VERTEX_PROJECT DYLEN_GEMINI_VERTEX_LOCATION DYLEN_GEMINI_BASE_URL \
  DYLEN_GEMINI_TIMEOUT_SECONDS DYLEN_MODEL_LIMITS DYLEN_MODEL_PRICES DYLEN_MODEL_SLOT_WAIT_SECONDS \
  DYLEN_MODEL_CALL_BODIES DYLEN_MODEL_CALL_RETENTION_DAYS; do
  if [[ -n "${!passthrough:-}" ]]; then add_env "$passthrough" "${!passthrough}"; fi
done

for name in "${FUNCTIONS[@]}"; do
  stage "$name"
  role="$(role_of "$name")"
  read -r threads pool overflow concurrency max_instances <<<"$(runtime_of "$name")"
  FUNCTION_ENV="$ENV_VARS|DYLEN_DB_USER=$(db_user_of "$role")|THREADS=$threads|DYLEN_DB_POOL_SIZE=$pool"
  FUNCTION_ENV+="|DYLEN_DB_MAX_OVERFLOW=$overflow"
  DEPLOY=(
    gcloud functions deploy "$name" --gen2 --runtime python312 --trigger-http --entry-point "$name"
    --source "$BUILD_DIR/$name" --region "$REGION" --service-account "$(sa_email "$role")"
    --build-service-account "projects/$PROJECT/serviceAccounts/$BUILD_SA"
    --set-env-vars "$FUNCTION_ENV" --cpu 1 --memory 512Mi
    --concurrency "$concurrency" --max-instances "$max_instances" --update-labels "$MANAGED_LABEL"
  )
  [[ ${#VPC_FLAGS[@]} -eq 0 ]] || DEPLOY+=("${VPC_FLAGS[@]}" --egress-settings private-ranges-only)
  DEPLOY+=("${SECRET_FLAGS[@]}")
  caller="$(caller_of "$name")"
  case "$caller" in
    tasks) DEPLOY+=(--no-allow-unauthenticated --timeout "${DEADLINE}s") ;;
    scheduler) DEPLOY+=(--no-allow-unauthenticated --timeout 540s) ;;
    operators) DEPLOY+=(--no-allow-unauthenticated --timeout 60s) ;;
    *)
      if [[ "$PUBLIC_ACCESS" == all-users ]]; then
        DEPLOY+=(--allow-unauthenticated --timeout 60s)
      else
        DEPLOY+=(--no-allow-unauthenticated --timeout 60s)
      fi
      ;;
  esac
  DEPLOY+=("${G[@]}")
  if ! AS_IDENTITY=1 attempt "${DEPLOY[@]}"; then
    if [[ "$caller" == user && "$PUBLIC_ACCESS" == all-users ]] && grep -Eq "$REFUSED_RE" "$ERR_FILE"; then
      # gcloud deploys the function, then binds allUsers: the organisation refused the binding.
      echo "(the organisation refuses allUsers: this and the remaining public functions get Cloud Run's" \
        "invoker IAM check off instead; pass --public-access no-invoker-iam-check next time)"
      PUBLIC_ACCESS=no-invoker-iam-check
    else
      die "deploying $name failed (gcloud's error is above). The functions before it are deployed (new" \
        "version), the ones after it are not; fix the cause and run deploy.sh again."
    fi
  fi
  if [[ "$caller" == user && "$PUBLIC_ACCESS" == no-invoker-iam-check ]]; then
    open_without_iam_check "$name"
  fi
done

echo "== Invokers"
expected_invokers() {
  case "$(caller_of "$1")" in
    tasks) echo "serviceAccount:$INVOKER_SA" ;;
    scheduler) echo "serviceAccount:$SCHEDULER_SA" ;;
    operators)
      local emails email
      IFS=',' read -r -a emails <<<"$OPERATORS"
      for email in "${emails[@]}"; do
        email="${email// /}"
        [[ -z "$email" ]] || echo "user:$email"
      done
      ;;
  esac
}
for name in "${FUNCTIONS[@]}"; do
  caller="$(caller_of "$name")"
  [[ "$caller" != user ]] || continue
  [[ "$caller" != operators || -n "$OPERATORS" ]] || echo "(no DYLEN_DASHBOARD_OPERATORS: nobody may invoke $name)"
  while IFS= read -r member; do
    [[ -z "$member" ]] || run gcloud functions add-invoker-policy-binding "$name" --region "$REGION" \
      --member "$member" "${G[@]}"
  done < <(expected_invokers "$name")
  if [[ $PRUNE -eq 1 ]]; then
    read_value "${name//_/-}" "service ${name//_/-}" gcloud functions describe "$name" --region "$REGION" \
      --format 'value(serviceConfig.service)' "${G[@]}" || die "cannot read the Cloud Run service of $name"
    service="$(basename "$(cat "$OUT_FILE")")"
    read_value '' "no invoker but the ones above" gcloud run services get-iam-policy "$service" --region "$REGION" \
      --flatten 'bindings[].members' --filter 'bindings.role:roles/run.invoker' \
      --format 'value(bindings.members)' "${G[@]}" || die "cannot read who may invoke $name"
    expected="$(expected_invokers "$name")"
    while IFS= read -r member; do
      if [[ -n "$member" ]] && ! grep -qxF -- "$member" <<<"$expected"; then
        run gcloud functions remove-invoker-policy-binding "$name" --region "$REGION" --member "$member" "${G[@]}"
      fi
    done <"$OUT_FILE"
  fi
done

echo "== Cloud Scheduler"
EXPECTED_JOBS=()
for entry in "${SCHEDULES[@]}"; do
  read -r name schedule <<<"$entry"
  if ! has_function "$name"; then
    echo "(no functions/$name yet: no scheduler job)"
    continue
  fi
  job="dylen-$name"
  EXPECTED_JOBS+=("$job")
  url="$BASE_URL/$name"
  COMMON_FLAGS=(
    --location "$REGION" --schedule "$schedule" --time-zone Etc/UTC --uri "$url" --http-method POST
    --message-body '{}' --oidc-service-account-email "$SCHEDULER_SA" --oidc-token-audience "$url"
    --attempt-deadline 540s "${G[@]}"
  )
  if exists gcloud scheduler jobs describe "$job" --location "$REGION" "${G[@]}"; then
    run gcloud scheduler jobs update http "$job" "${COMMON_FLAGS[@]}" \
      --update-headers Content-Type=application/json
  else
    AS_IDENTITY=1 run gcloud scheduler jobs create http "$job" "${COMMON_FLAGS[@]}" \
      --headers Content-Type=application/json
  fi
done

if [[ $PRUNE -eq 1 ]]; then
  echo "== Prune: what the repository no longer has"
  read_value '' "no scheduler job but the ones above" gcloud scheduler jobs list --location "$REGION" --format 'value(name)' "${G[@]}" \
    || die "cannot list the scheduler jobs"
  while IFS= read -r job; do
    job="$(basename "$job")"
    [[ "$job" == dylen-* ]] || continue
    if ! printf '%s\n' "${EXPECTED_JOBS[@]}" | grep -qxF -- "$job"; then
      run gcloud scheduler jobs delete "$job" --location "$REGION" --quiet "${G[@]}"
    fi
  done <"$OUT_FILE"
  read_value '' "no function but the ones above" gcloud functions list --regions "$REGION" --filter "labels.$MANAGED_LABEL" \
    --format 'value(name)' "${G[@]}" || die "cannot list the functions"
  while IFS= read -r function; do
    function="$(basename "$function")"
    if [[ -n "$function" ]] && ! printf '%s\n' "${FUNCTIONS[@]}" | grep -qxF -- "$function"; then
      run gcloud functions delete "$function" --region "$REGION" --quiet "${G[@]}"
    fi
  done <"$OUT_FILE"
fi

write_file "$RECORD" "# deploy.sh: what the last deployment from this folder pinned" \
  "project=$PROJECT" "region=$REGION" "functions=${FUNCTIONS[*]}" "public_access=$PUBLIC_ACCESS" \
  "migration_image=$([[ $SKIP_MIGRATIONS -eq 1 ]] && echo skipped || echo "$IMAGE")" \
  "db_password_secret=${DB_PASSWORD_SECRET:+$DB_PASSWORD_SECRET:$DB_PASSWORD_SECRET_VERSION}"
echo "== Done: $BASE_URL/<function>"
