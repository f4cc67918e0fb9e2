"""What a launcher's values must look like before they go into a script, manifest or command.

Every option of `metatrain launch` and every word of the train command lands where
another parser reads it: bash (the Slurm script, the command a TPU worker runs over
ssh), sbatch's `#SBATCH` lines, a YAML manifest that Kubernetes and JobSet's webhook
check, a `#` comment. Quoting covers bash (`shlex.quote`) and YAML (the serializer). It
cannot cover an `#SBATCH` line (sbatch splits words its own way and stops reading
directives at the first command), nor a comment (a newline ends it), and no quoting
makes a name one Kubernetes or Compute Engine accepts. So values are checked here,
before a plan is made, and refused in one line that names the option, shows the value
(repr'd, so a newline shows as `\\n`) and says what would be accepted:

    --job-name 'run\\ntouch /tmp/x': a Slurm job name must be ...; e.g. --job-name my-run

Placeholders live here too: an option a cluster must supply defaults to `<OPTION_NAME>`
(`placeholder`), and a value equal to its option's placeholder passes the checks: a plan
that still holds one is printed by `--dry-run` and never run (`plan.execute` refuses it).

What is not here: how values are quoted (each launcher, where it writes them) and how
paths are resolved for the job (`plan`).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Mapping

from metatrain.errors import UserError

PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)>")


def placeholder(option: str) -> str:
    """The placeholder an option defaults to under --dry-run: `--tpu-name` -> `<TPU_NAME>`."""
    return "<" + option.lstrip("-").replace("-", "_").upper() + ">"


def option_of(name: str) -> str:
    """The option that fills placeholder `<NAME>`: `TPU_NAME` -> `--tpu-name`."""
    return "--" + name.lower().replace("_", "-")


#: Unicode categories refused everywhere: controls (newline, carriage return, tab, NUL,
#: ESC, NEL), format characters (e.g. U+202E, which reorders what a reader sees) and the
#: line and paragraph separators (U+2028, U+2029, which end a line for many readers).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def refusal(option: str, value: object, why: str) -> UserError:
    """The one-line error for a refused value: `OPTION 'VALUE': WHY`."""
    return UserError(f"{option} {value!r}: {why}")


def control_character(text: str) -> str | None:
    """The first control, format or line-separator character in `text`, or None."""
    return next((c for c in text if unicodedata.category(c) in _REFUSED_CATEGORIES), None)


def check_text(option: str, value: str) -> str:
    """`value`, if it has no control characters (it goes on one line of a script or command).

    Raises:
        UserError: a newline, carriage return, tab, other control or format character.
    """
    bad = control_character(value)
    if bad is not None:
        raise refusal(
            option, value,
            f"control characters such as {bad!r} are not allowed in a launched command (a newline "
            "would start a command of its own); remove it",
        )
    return value


def check_path(option: str, value: str) -> str:
    """A path that goes into a command line: no control characters, not starting with `-`.

    Raises:
        UserError: a control character, or a leading `-` (a command would take it for an option).
    """
    check_text(option, value)
    if value.startswith("-"):
        raise refusal(option, value, f"a path may not start with '-' (it would be read as an option); write ./{value}")
    return value


def check_range(option: str, value: int, low: int, high: int | None = None, what: str = "") -> int:
    """`value` if `low <= value <= high` (no upper bound when `high` is None).

    Raises:
        UserError: out of range, naming the range.
    """
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f"at least {low}"
        raise refusal(option, value, f"{what or 'the value'} must be {bounds}")
    return value


def check_port(option: str, port: int) -> int:
    """A TCP port other processes connect to: 1..65535 (0 would mean "any", unknown to them)."""
    return check_range(option, port, 1, 65535, "a TCP port")


def check_env(option: str, env: Mapping[str, str]) -> Mapping[str, str]:
    """Extra environment variables: names of letters, digits and '_'; values on one line.

    Raises:
        UserError: a bad name, or a value with a control character.
    """
    for key, value in env.items():
        ENV_NAME.check(option, key)
        check_text(option, f"{key}={value}")
    return env


@dataclasses.dataclass(frozen=True)
class Name:
    """A kind of name a target system accepts.

    Attributes:
        what: the name in words, e.g. "a Kubernetes namespace (a DNS-1123 label)".
        pattern: the whole name must match this (ASCII only).
        rule: the pattern in words.
        max_len: the longest name accepted.
        example: a valid name, shown in the refusal.
    """

    what: str
    pattern: str
    rule: str
    max_len: int
    example: str

    def check(self, option: str, value: str, max_len: int | None = None, why_max: str = "") -> str:
        """`value` if it is such a name (or the option's placeholder) of at most `max_len`
        characters (default `self.max_len`; `why_max` explains a tighter limit).

        Raises:
            UserError: naming the option, the value, the rule and the limit.
        """
        if value == placeholder(option):
            return value
        limit = self.max_len if max_len is None else max_len
        if re.fullmatch(self.pattern, value, flags=re.ASCII) and len(value) <= limit:
            return check_text(option, value)  # a pattern may allow more than one line's worth
        length = f"; this one has {len(value)}" if len(value) > limit else ""
        raise refusal(
            option, value,
            f"{self.what} must be {self.rule}, at most {limit} characters{why_max}{length}; "
            f"e.g. {option} {self.example}",
        )


_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_LABEL_RULE = "lower-case letters, digits and '-', starting with a letter and ending with a letter or digit"
_LABEL_1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL_1123_RULE = "lower-case letters, digits and '-', starting and ending with a letter or digit"

# -- Kubernetes (apimachinery's IsDNS1035Label / IsDNS1123Label / IsDNS1123Subdomain) --------

#: JobSet's webhook checks its pod names (hence its own name) with IsDNS1035Label:
#: kubernetes-sigs/jobset, pkg/webhooks/jobset_webhook.go (ValidateCreate).
JOBSET_NAME = Name("a JobSet name (a DNS-1035 label)", _LABEL, _LABEL_RULE, 63, "metatrain")
NAMESPACE = Name("a Kubernetes namespace (a DNS-1123 label)", _LABEL_1123, _LABEL_1123_RULE, 63, "default")
SERVICE_ACCOUNT = Name(
    "a Kubernetes service account name (a DNS-1123 subdomain)", rf"{_LABEL_1123}(\.{_LABEL_1123})*",
    f"dot-separated parts of {_LABEL_1123_RULE}", 253, "metatrain",
)
ENV_NAME = Name("an environment variable name", r"[A-Za-z_][A-Za-z0-9_]*",
                "letters, digits and '_', not starting with a digit", 255, "NCCL_DEBUG=WARN")
IMAGE = Name("a container image reference", r"[A-Za-z0-9][A-Za-z0-9._/:@-]*",
             "REGISTRY/REPOSITORY[:TAG][@DIGEST]: letters, digits, '.', '_', '-', '/', ':' and '@'", 512,
             "us-docker.pkg.dev/my-project/images/metatrain:1")

# -- Google Cloud --------------------------------------------------------------------------

GCP_PROJECT = Name(
    "a Google Cloud project ID", r"([a-z][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]",
    "6 to 30 lower-case letters, digits and '-', starting with a letter and ending with a letter or "
    "digit (after DOMAIN: for a domain-scoped project)", 94, "my-project",
)
GCP_ZONE = Name("a Google Cloud zone", r"[a-z]+-[a-z]+[0-9]+-[a-z]", "REGION-LETTER, lower case", 63, "us-east5-a")
#: Compute Engine resource names (TPU VMs) are RFC 1035 labels.
TPU_NAME = Name("a TPU VM name", _LABEL, _LABEL_RULE, 63, "my-tpu")
GKE_CLUSTER = Name("a GKE cluster name", _LABEL, _LABEL_RULE, 40, "my-cluster")
#: xpk's own check: AI-Hypercomputer/xpk, src/xpk/parser/validators.py (workload_name_type).
XPK_WORKLOAD = Name("an xpk workload name", _LABEL, _LABEL_RULE, 40, "metatrain")
#: Cloud Storage: 3-63 characters, 222 with dots, 63 between dots.
GCS_BUCKET = Name(
    "a Cloud Storage bucket name", r"(?!.*[^.]{64})[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]",
    "lower-case letters, digits, '-', '_' and '.', starting and ending with a letter or digit, "
    "3 to 63 characters between dots", 222, "my-bucket",
)

# -- git -------------------------------------------------------------------------------------

GIT_URL = Name("a git repository URL", r"[^\s'\"\\-][^\s'\"\\]*",
               "a URL or path without spaces, quotes or backslashes, not starting with '-'", 2048,
               "https://github.com/me/metatrain.git")
#: A subset of `git check-ref-format`: no '..', no leading '-', no trailing '.', '/' or '.lock'.
GIT_REF = Name("a git branch or tag", r"(?!-)(?!.*\.\.)(?!.*\.lock$)[A-Za-z0-9._/+-]*[A-Za-z0-9_+-]",
               "letters, digits, '.', '_', '+', '/' and '-', not starting with '-' nor containing '..'",
               255, "main")

# -- Slurm -----------------------------------------------------------------------------------
# sbatch reads `#SBATCH` lines with its own word splitting (src/sbatch/opt.c, _get_argument):
# whitespace ends a word, quotes and backslashes are consumed, an unquoted '#' starts a
# comment. Values are refused rather than quoted for it: letters, digits and '._-' only.

#: The output file `<name>-<job id>.out` must fit in a file name (255 bytes, job id up to 10 digits).
SLURM_JOB_NAME = Name(
    "a Slurm job name", r"[A-Za-z0-9][A-Za-z0-9._-]*",
    "letters, digits, '.', '_' and '-', starting with a letter or digit (it goes into #SBATCH lines and "
    "the output file name: no spaces, quotes, '#', '%' or '/')", 240, "my-run",
)
SLURM_PARTITION = Name("a Slurm partition (or comma-separated partitions)", r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*",
                       "letters, digits, '.', '_' and '-', partitions separated by ','", 255, "gpu")
SLURM_ACCOUNT = Name("a Slurm account", r"[A-Za-z0-9_.-]+", "letters, digits, '.', '_' and '-'", 255, "my-account")
SLURM_TIME = Name(
    "a Slurm time limit", r"[0-9]+(:[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(:[0-9]{1,2}){0,2}|UNLIMITED|INFINITE",
    "MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES, "
    "DAYS-HOURS:MINUTES:SECONDS or UNLIMITED", 32, "24:00:00",
)
