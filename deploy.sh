#!/usr/bin/env bash
# deploy.sh: deploy dylen-jobs to Google Cloud. Creates or updates, in order: APIs, service accounts,
# IAM bindings, the Cloud SQL database and IAM user, the Cloud Tasks queue, the schema (rights and
# migrations), every function
# under functions/ (staged into build/<name>/ with a copy of common/), invoker bindings and the Cloud
# Scheduler jobs. Every step describes before it creates, so running it twice is safe.
#
#   ./deploy.sh --project P --region R --sql-instance P:R:I [--dry-run] [--stage-only] [...]
#   ./deploy.sh --help
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Who calls each function. Functions not listed are user-facing: deployed public
# (--allow-unauthenticated) because they verify Firebase ID tokens themselves. Listed ones are
# --no-allow-unauthenticated and only their caller's service account gets roles/run.invoker; the
# dashboard's callers are the people on DYLEN_DASHBOARD_OPERATORS (it checks that list itself too).
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

usage() {
  cat <<'EOF'
Usage: ./deploy.sh [options]

Each option can also come from the environment variable named after it. Required: --project,
--region, --sql-instance; the project and region default to gcloud's own configuration
(`gcloud config get-value project`, `gcloud config get-value functions/region`).

  --project ID             DYLEN_GCP_PROJECT          Google Cloud project
  --region REGION          DYLEN_GCP_REGION           region of functions, queue and scheduler jobs
  --sql-instance P:R:I     DYLEN_CLOUD_SQL_INSTANCE   Cloud SQL instance connection name
  --db-name NAME           DYLEN_DB_NAME              database (default: dylen)
  --db-password-secret S   DYLEN_DB_PASSWORD_SECRET   Secret Manager secret holding the database
                                                      password; without it IAM database auth is used
  --db-user USER           DYLEN_DB_USER              database user (default with IAM auth: the
                                                      runtime service account's IAM user; else dylen)
  --migrate-db-user USER   DYLEN_MIGRATE_DB_USER      database user migrations run as (default: --db-user)
  --queue NAME             DYLEN_TASKS_QUEUE          Cloud Tasks queue id (default: dylen-jobs)
  --firebase-project ID    DYLEN_FIREBASE_PROJECT_ID  Firebase project of user tokens (default: --project)
  --build-dir DIR          DYLEN_BUILD_DIR            staging folder (default: build)
  --dry-run                print every command, run none
  --stage-only             only stage build/<name>/ folders (no gcloud, no network)
  --skip-migrations        do not grant schema rights or run `python -m common.cli migrate`
  -h, --help               this text

Schema rights (PostgreSQL 15+ gives ordinary users no CREATE on schema public): with
DYLEN_DB_ADMIN_PASSWORD (the instance's built-in postgres user's password; environment only, never
printed) the script grants USAGE and CREATE on public to the database user(s) before migrating.
A new database needs this once; without the variable the step is skipped and says so.

Tuning (environment only): DYLEN_JOB_MAX_ATTEMPTS (5), DYLEN_JOB_TIMEOUT_SECONDS (600),
DYLEN_QUEUE_MIN_BACKOFF (10s), DYLEN_QUEUE_MAX_BACKOFF (300s), DYLEN_QUEUE_MAX_DOUBLINGS (4),
DYLEN_QUEUE_MAX_DISPATCHES_PER_SECOND (10), DYLEN_QUEUE_MAX_CONCURRENT_DISPATCHES (20),
DYLEN_RUNTIME_SA_NAME (dylen-runtime), DYLEN_INVOKER_SA_NAME (dylen-tasks),
DYLEN_SCHEDULER_SA_NAME (dylen-scheduler), PYTHON (.venv/bin/python, for migrations).
Passed through to the functions when set: DYLEN_TIER_HISTORY_LIMITS, DYLEN_TIER_DAILY_JOBS,
DYLEN_TIER_ACTIVE_JOBS, DYLEN_RESCUE_AFTER_SECONDS, DYLEN_LESSON_GENERATOR, DYLEN_LOG_LEVEL,
DYLEN_DASHBOARD_AUDIENCE.
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
DB_PASSWORD_SECRET="${DYLEN_DB_PASSWORD_SECRET:-}"
MIGRATE_DB_USER="${DYLEN_MIGRATE_DB_USER:-}"
QUEUE="${DYLEN_TASKS_QUEUE:-dylen-jobs}"
FIREBASE_PROJECT="${DYLEN_FIREBASE_PROJECT_ID:-}"
BUILD_DIR="${DYLEN_BUILD_DIR:-build}"
DRY_RUN=0
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
    --db-password-secret) need_value "$@"; DB_PASSWORD_SECRET="$2"; shift 2 ;;
    --migrate-db-user) need_value "$@"; MIGRATE_DB_USER="$2"; shift 2 ;;
    --queue) need_value "$@"; QUEUE="$2"; shift 2 ;;
    --firebase-project) need_value "$@"; FIREBASE_PROJECT="$2"; shift 2 ;;
    --build-dir) need_value "$@"; BUILD_DIR="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --stage-only) STAGE_ONLY=1; shift ;;
    --skip-migrations) SKIP_MIGRATIONS=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

MAX_ATTEMPTS="${DYLEN_JOB_MAX_ATTEMPTS:-5}"
JOB_TIMEOUT="${DYLEN_JOB_TIMEOUT_SECONDS:-600}"
MIN_BACKOFF="${DYLEN_QUEUE_MIN_BACKOFF:-10s}"
MAX_BACKOFF="${DYLEN_QUEUE_MAX_BACKOFF:-300s}"
MAX_DOUBLINGS="${DYLEN_QUEUE_MAX_DOUBLINGS:-4}"
MAX_DISPATCHES_PER_SECOND="${DYLEN_QUEUE_MAX_DISPATCHES_PER_SECOND:-10}"
MAX_CONCURRENT_DISPATCHES="${DYLEN_QUEUE_MAX_CONCURRENT_DISPATCHES:-20}"
RUNTIME_SA_NAME="${DYLEN_RUNTIME_SA_NAME:-dylen-runtime}"
INVOKER_SA_NAME="${DYLEN_INVOKER_SA_NAME:-dylen-tasks}"
SCHEDULER_SA_NAME="${DYLEN_SCHEDULER_SA_NAME:-dylen-scheduler}"

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
if ! is_int "$MAX_ATTEMPTS" || ((MAX_ATTEMPTS < 1 || MAX_ATTEMPTS > 100)); then
  die "DYLEN_JOB_MAX_ATTEMPTS must be an integer from 1 to 100, got '$MAX_ATTEMPTS'"
fi
if ! is_int "$JOB_TIMEOUT" || ((JOB_TIMEOUT < 1)); then
  die "DYLEN_JOB_TIMEOUT_SECONDS must be a positive integer, got '$JOB_TIMEOUT'"
fi
is_int "$MAX_DOUBLINGS" || die "DYLEN_QUEUE_MAX_DOUBLINGS must be an integer, got '$MAX_DOUBLINGS'"
[[ "$MIN_BACKOFF" =~ ^[0-9.]+s$ ]] || die "DYLEN_QUEUE_MIN_BACKOFF must look like 10s, got '$MIN_BACKOFF'"
[[ "$MAX_BACKOFF" =~ ^[0-9.]+s$ ]] || die "DYLEN_QUEUE_MAX_BACKOFF must look like 300s, got '$MAX_BACKOFF'"

# Cloud Tasks accepts HTTP dispatch deadlines of 15 s to 30 min (common/jobs/dispatch/cloud_tasks.py clamps the
# same way); process_job's request timeout matches it, so neither side cuts the other off.
DEADLINE=$((JOB_TIMEOUT < 15 ? 15 : (JOB_TIMEOUT > 1800 ? 1800 : JOB_TIMEOUT)))

FUNCTIONS=()
for dir in "$ROOT"/functions/*/; do
  [[ -f "${dir}main.py" ]] && FUNCTIONS+=("$(basename "$dir")")
done
[[ ${#FUNCTIONS[@]} -gt 0 ]] || die "no functions/<name>/main.py found under $ROOT"

# Per-function instance settings (docs/PERFORMANCE.md, "Cloud Run settings"): gunicorn threads,
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

has_function() {
  [[ -f "$ROOT/functions/$1/main.py" ]]
}

# Print a command (shell-quoted, so it can be pasted), then run it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $DRY_RUN -eq 0 ]]; then
    "$@"
  fi
}

# Does a resource exist? Runs a describe command quietly; under --dry-run prints it and answers
# "no", so the dry run shows the create commands of a first deployment.
exists() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '  # dry run: assumed absent\n'
    return 1
  fi
  "$@" >/dev/null 2>&1
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
  if [[ $DRY_RUN -eq 0 ]]; then
    printf '%s\n' '# Generated by deploy.sh' '__pycache__/' '*.pyc' '.env' '.venv/' >"$dest/.gcloudignore"
  fi
  echo "+ write $dest/.gcloudignore"
}

if [[ $STAGE_ONLY -eq 1 ]]; then
  for name in "${FUNCTIONS[@]}"; do
    stage "$name"
  done
  echo "Staged ${#FUNCTIONS[@]} functions in $BUILD_DIR: ${FUNCTIONS[*]}"
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
if [[ $DRY_RUN -eq 0 ]]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud is not on PATH (install the Google Cloud SDK)"
fi

RUNTIME_SA="$RUNTIME_SA_NAME@$PROJECT.iam.gserviceaccount.com"
INVOKER_SA="$INVOKER_SA_NAME@$PROJECT.iam.gserviceaccount.com"
SCHEDULER_SA="$SCHEDULER_SA_NAME@$PROJECT.iam.gserviceaccount.com"
if [[ -z "$DB_PASSWORD_SECRET" ]]; then
  DB_IAM_AUTH=true
  # Cloud SQL names a service account's IAM user by its email without ".gserviceaccount.com".
  DB_USER="${DB_USER:-$RUNTIME_SA_NAME@$PROJECT.iam}"
else
  DB_IAM_AUTH=false
  DB_USER="${DB_USER:-dylen}"
fi
MIGRATE_DB_USER="${MIGRATE_DB_USER:-$DB_USER}"
SQL_INSTANCE_NAME="${SQL_INSTANCE##*:}"
SQL_PROJECT="${SQL_INSTANCE%%:*}"
BASE_URL="https://$REGION-$PROJECT.cloudfunctions.net"
QUEUE_PATH="projects/$PROJECT/locations/$REGION/queues/$QUEUE"
G=(--project "$PROJECT")

# The connection budget (docs/PERFORMANCE.md, "Connection budget"): every function at its max
# instances with its pool full (DYLEN_DB_POOL_SIZE + DYLEN_DB_MAX_OVERFLOW) must fit the instance's
# max_connections minus a reserve (PostgreSQL's superuser slots, Cloud SQL's own agents, migrations,
# operators), or at full scale requests fail with "too many clients". The instance's value is its
# max_connections flag, else Cloud SQL's default for its memory; DYLEN_DB_MAX_CONNECTIONS overrides
# both (and is what a dry run, which reads no instance, checks against).
check_connection_budget() {
  local name threads pool overflow concurrency max_instances total=0 parts=() limit origin flags tier mb
  local reserve="${DYLEN_DB_RESERVED_CONNECTIONS:-10}"
  is_int "$reserve" || die "DYLEN_DB_RESERVED_CONNECTIONS must be an integer, got '$reserve'"
  for name in "${FUNCTIONS[@]}"; do
    read -r threads pool overflow concurrency max_instances <<<"$(runtime_of "$name")"
    total=$((total + max_instances * (pool + overflow)))
    parts+=("$name ${max_instances}x($pool+$overflow)")
  done
  limit="${DYLEN_DB_MAX_CONNECTIONS:-}"
  origin="DYLEN_DB_MAX_CONNECTIONS"
  if [[ -z "$limit" && $DRY_RUN -eq 1 ]]; then
    echo "(connection budget: at most $total connections; a dry run reads no instance, so nothing is checked: set DYLEN_DB_MAX_CONNECTIONS to check it)"
    return 0
  fi
  if [[ -z "$limit" ]]; then
    origin="Cloud SQL instance $SQL_INSTANCE_NAME"
    flags="$(gcloud sql instances describe "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT" \
      --flatten settings.databaseFlags \
      --format "value(settings.databaseFlags.name,settings.databaseFlags.value)")" \
      || die "cannot describe Cloud SQL instance $SQL_INSTANCE_NAME in $SQL_PROJECT (for its max_connections)"
    limit="$(awk '$1 == "max_connections" { print $2 }' <<<"$flags")"
    if [[ -z "$limit" ]]; then
      tier="$(gcloud sql instances describe "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT" \
        --format "value(settings.tier)")" || die "cannot read the tier of Cloud SQL instance $SQL_INSTANCE_NAME"
      # Cloud SQL's default max_connections by the tier's memory (its "Quotas and limits" page).
      mb=""
      case "$tier" in
        db-f1-micro) limit=25 ;;
        db-g1-small) limit=50 ;;
        db-custom-*-*) mb="${tier##*-}" ;;
      esac
      if is_int "$mb"; then
        if ((mb < 6144)); then limit=100; elif ((mb < 7680)); then limit=200; elif ((mb < 15360)); then limit=400
        elif ((mb < 30720)); then limit=500; elif ((mb < 61440)); then limit=600; elif ((mb < 122880)); then limit=800
        else limit=1000; fi
      fi
      [[ -n "$limit" ]] || die "cannot tell the max_connections of Cloud SQL instance $SQL_INSTANCE_NAME (tier" \
        "'$tier', no max_connections flag): set DYLEN_DB_MAX_CONNECTIONS to its value (SHOW max_connections)"
      origin="$origin (tier $tier's default)"
    fi
  fi
  is_int "$limit" || die "max_connections of $origin must be an integer, got '$limit'"
  if ((total > limit - reserve)); then
    die "the functions may open $total database connections (max instances x (pool + overflow): ${parts[*]})," \
      "more than the $((limit - reserve)) that $origin allows (max_connections $limit minus" \
      "DYLEN_DB_RESERVED_CONNECTIONS $reserve). Lower max-instances, pool or overflow in RUNTIME_SETTINGS" \
      "(deploy.sh), or raise the instance's max_connections (its flag or a larger tier)"
  fi
  echo "(connection budget: at most $total of the $((limit - reserve)) connections $origin allows)"
}
check_connection_budget

echo "== Deploying ${FUNCTIONS[*]} to $PROJECT ($REGION)"

echo "== APIs"
APIS=(
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com artifactregistry.googleapis.com
  cloudtasks.googleapis.com cloudscheduler.googleapis.com sqladmin.googleapis.com iam.googleapis.com
)
# Password auth: the functions read the password from Secret Manager (--set-secrets).
[[ "$DB_IAM_AUTH" == true ]] || APIS+=(secretmanager.googleapis.com)
run gcloud services enable "${APIS[@]}" "${G[@]}"

echo "== Service accounts"
for sa_name in "$RUNTIME_SA_NAME" "$INVOKER_SA_NAME" "$SCHEDULER_SA_NAME"; do
  if ! exists gcloud iam service-accounts describe "$sa_name@$PROJECT.iam.gserviceaccount.com" "${G[@]}"; then
    run gcloud iam service-accounts create "$sa_name" --display-name "dylen-jobs $sa_name" "${G[@]}"
  fi
done

echo "== IAM"
# The runtime creates tasks, connects to Cloud SQL, and mints OIDC tokens as the invoker account.
run gcloud projects add-iam-policy-binding "$PROJECT" --member "serviceAccount:$RUNTIME_SA" \
  --role roles/cloudtasks.enqueuer --condition None
run gcloud projects add-iam-policy-binding "$SQL_PROJECT" --member "serviceAccount:$RUNTIME_SA" \
  --role roles/cloudsql.client --condition None
if [[ "$DB_IAM_AUTH" == true ]]; then
  run gcloud projects add-iam-policy-binding "$SQL_PROJECT" --member "serviceAccount:$RUNTIME_SA" \
    --role roles/cloudsql.instanceUser --condition None
else
  run gcloud secrets add-iam-policy-binding "$DB_PASSWORD_SECRET" --member "serviceAccount:$RUNTIME_SA" \
    --role roles/secretmanager.secretAccessor "${G[@]}"
fi
run gcloud iam service-accounts add-iam-policy-binding "$INVOKER_SA" --member "serviceAccount:$RUNTIME_SA" \
  --role roles/iam.serviceAccountUser "${G[@]}"

echo "== Cloud SQL database $DB_NAME on $SQL_INSTANCE_NAME"
if [[ "$DB_IAM_AUTH" == true ]]; then
  # IAM database users can log in only where the instance has this flag on. It is not switched on
  # here: `gcloud sql instances patch --database-flags` replaces every flag the instance has.
  DESCRIBE_FLAGS=(
    gcloud sql instances describe "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"
    --flatten settings.databaseFlags --format "value(settings.databaseFlags.name,settings.databaseFlags.value)"
  )
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '+'
    printf ' %q' "${DESCRIBE_FLAGS[@]}"
    printf '  # dry run: assumed cloudsql.iam_authentication=on\n'
  else
    FLAGS="$("${DESCRIBE_FLAGS[@]}")" || die "cannot describe Cloud SQL instance $SQL_INSTANCE_NAME in $SQL_PROJECT"
    grep -Eiq '^cloudsql\.iam_authentication[[:space:]]+on$' <<<"$FLAGS" || die \
      "Cloud SQL instance $SQL_INSTANCE_NAME does not have cloudsql.iam_authentication=on, which IAM database" \
      "auth needs. Add it to the instance's flags (gcloud sql instances patch $SQL_INSTANCE_NAME --database-flags" \
      "cloudsql.iam_authentication=on,<every flag it already has>), or use --db-password-secret"
  fi
fi
if ! exists gcloud sql databases describe "$DB_NAME" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"; then
  run gcloud sql databases create "$DB_NAME" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"
fi

echo "== Cloud SQL user"
if [[ "$DB_IAM_AUTH" == true ]]; then
  if ! exists gcloud sql users describe "$DB_USER" --instance "$SQL_INSTANCE_NAME" --project "$SQL_PROJECT"; then
    run gcloud sql users create "$DB_USER" --instance "$SQL_INSTANCE_NAME" --type cloud_iam_service_account \
      --project "$SQL_PROJECT"
  fi
else
  echo "(password auth: user '$DB_USER' and secret '$DB_PASSWORD_SECRET' are managed by you)"
fi

echo "== Cloud Tasks queue $QUEUE"
QUEUE_FLAGS=(
  --location "$REGION"
  --max-attempts "$MAX_ATTEMPTS"
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
fi

echo "== Schema"
if [[ $SKIP_MIGRATIONS -eq 1 ]]; then
  echo "(skipped: --skip-migrations)"
else
  PY="${PYTHON:-}"
  if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
  fi
  GRANT_USERS=("$DB_USER")
  [[ "$MIGRATE_DB_USER" == "$DB_USER" ]] || GRANT_USERS+=("$MIGRATE_DB_USER")
  if [[ $DRY_RUN -eq 1 || -n "${DYLEN_DB_ADMIN_PASSWORD:-}" ]]; then
    # As the built-in postgres user; the password goes through the environment, never printed.
    export DYLEN_DB_ADMIN_PASSWORD="${DYLEN_DB_ADMIN_PASSWORD:-}"
    run env "PYTHONPATH=$ROOT" "DYLEN_CLOUD_SQL_INSTANCE=$SQL_INSTANCE" "DYLEN_DB_NAME=$DB_NAME" \
      "$PY" -m devtools.grant_schema "${GRANT_USERS[@]}"
  else
    echo "(schema rights skipped: DYLEN_DB_ADMIN_PASSWORD is not set. A new database needs them once, or the"
    echo " migrations fail with 'permission denied for schema public': set it to the built-in postgres"
    echo " user's password and run again, or as that user: GRANT USAGE, CREATE ON SCHEMA public TO \"${GRANT_USERS[0]}\")"
  fi
  MIGRATE_ENV=(
    "PYTHONPATH=$ROOT"
    "DYLEN_AUTH_MODE=dev"
    "DYLEN_CLOUD_SQL_INSTANCE=$SQL_INSTANCE"
    "DYLEN_DB_NAME=$DB_NAME"
    "DYLEN_DB_USER=$MIGRATE_DB_USER"
    "DYLEN_DB_IAM_AUTH=$DB_IAM_AUTH"
  )
  if [[ "$DB_IAM_AUTH" == false ]]; then
    [[ $DRY_RUN -eq 1 || -n "${DYLEN_DB_PASSWORD:-}" ]] \
      || die "DYLEN_DB_PASSWORD is required to run the migrations with password auth (or --skip-migrations)"
    # Passed through the environment, never printed.
    export DYLEN_DB_PASSWORD="${DYLEN_DB_PASSWORD:-}"
  fi
  run env "${MIGRATE_ENV[@]}" "$PY" -m common.cli migrate
fi

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
add_env DYLEN_DB_USER "$DB_USER"
add_env DYLEN_DB_IAM_AUTH "$DB_IAM_AUTH"
add_env DYLEN_JOB_MAX_ATTEMPTS "$MAX_ATTEMPTS"
add_env DYLEN_JOB_TIMEOUT_SECONDS "$JOB_TIMEOUT"
OPERATORS="${DYLEN_DASHBOARD_OPERATORS:-}"
[[ -z "$OPERATORS" ]] || add_env DYLEN_DASHBOARD_OPERATORS "$OPERATORS"
for passthrough in DYLEN_TIER_HISTORY_LIMITS DYLEN_TIER_DAILY_JOBS DYLEN_TIER_ACTIVE_JOBS \
  DYLEN_RESCUE_AFTER_SECONDS DYLEN_LESSON_GENERATOR DYLEN_LOG_LEVEL DYLEN_DASHBOARD_AUDIENCE; do
  if [[ -n "${!passthrough:-}" ]]; then add_env "$passthrough" "${!passthrough}"; fi
done

for name in "${FUNCTIONS[@]}"; do
  stage "$name"
  read -r threads pool overflow concurrency max_instances <<<"$(runtime_of "$name")"
  FUNCTION_ENV="$ENV_VARS|THREADS=$threads|DYLEN_DB_POOL_SIZE=$pool|DYLEN_DB_MAX_OVERFLOW=$overflow"
  DEPLOY=(
    gcloud functions deploy "$name" --gen2 --runtime python312 --trigger-http --entry-point "$name"
    --source "$BUILD_DIR/$name" --region "$REGION" --service-account "$RUNTIME_SA"
    --set-env-vars "$FUNCTION_ENV" --cpu 1 --memory 512Mi
    --concurrency "$concurrency" --max-instances "$max_instances" "${G[@]}"
  )
  if [[ "$DB_IAM_AUTH" == false ]]; then
    DEPLOY+=(--set-secrets "DYLEN_DB_PASSWORD=$DB_PASSWORD_SECRET:latest")
  fi
  case "$(caller_of "$name")" in
    tasks) DEPLOY+=(--no-allow-unauthenticated --timeout "${DEADLINE}s") ;;
    scheduler) DEPLOY+=(--no-allow-unauthenticated --timeout 540s) ;;
    operators) DEPLOY+=(--no-allow-unauthenticated --timeout 60s) ;;
    *) DEPLOY+=(--allow-unauthenticated --timeout 60s) ;;
  esac
  run "${DEPLOY[@]}"
done

echo "== Invokers"
for name in "${FUNCTIONS[@]}"; do
  case "$(caller_of "$name")" in
    tasks) member="$INVOKER_SA" ;;
    scheduler) member="$SCHEDULER_SA" ;;
    operators)
      [[ -n "$OPERATORS" ]] || echo "(no DYLEN_DASHBOARD_OPERATORS: nobody may invoke $name)"
      IFS=',' read -r -a emails <<<"$OPERATORS"
      for email in "${emails[@]}"; do
        email="${email// /}"
        [[ -z "$email" ]] || run gcloud functions add-invoker-policy-binding "$name" --region "$REGION" \
          --member "user:$email" "${G[@]}"
      done
      continue
      ;;
    *) continue ;;
  esac
  run gcloud functions add-invoker-policy-binding "$name" --region "$REGION" \
    --member "serviceAccount:$member" "${G[@]}"
done

echo "== Cloud Scheduler"
for entry in "${SCHEDULES[@]}"; do
  read -r name schedule <<<"$entry"
  if ! has_function "$name"; then
    echo "(no functions/$name yet: no scheduler job)"
    continue
  fi
  job="dylen-$name"
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
    run gcloud scheduler jobs create http "$job" "${COMMON_FLAGS[@]}" --headers Content-Type=application/json
  fi
done

echo "== Done: $BASE_URL/<function>"
