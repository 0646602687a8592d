"""cfn-lint on the transformed template (scripts/transform_template.py), around two known cfn-lint defects.

Usage: .tools/cfnlint/bin/python scripts/lint_transformed.py [.aws-sam/transformed.json]

`sam validate --lint` checks template.yaml as SAM wrote it; this checks what CloudFormation receives: the
generated roles and permissions, and the state machine definition (inlined by the transform). Every
error and warning fails it, except the false positives listed in KNOWN_DEFECTS.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from cfnlint.api import ManualArgs, lint
from cfnlint.version import __version__

REGION = "us-east-1"


def _succeed_states(template: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for resource in template.get("Resources", {}).values():
        definition = resource.get("Properties", {}).get("DefinitionString")
        if resource.get("Type") == "AWS::StepFunctions::StateMachine" and isinstance(definition, str):
            states = json.loads(definition).get("States", {})
            names |= {name for name, state in states.items() if state.get("Type") == "Succeed"}
    return names


# (rule, message pattern, why it is not a problem). Each pattern names the construct it excuses exactly.
KNOWN_DEFECTS = [
    (
        "E3601",
        re.compile(r"\('OutputPath' was unexpected\) at 'States/(?P<state>[^/']+)/OutputPath'"),
        "cfn-lint's Succeed-state schema knows only JSONata's Output; the Amazon States Language lets a "
        "JSONPath Succeed state have InputPath and OutputPath (states-language.net, the state-type table)",
    ),
]


def _join_definitions(template: dict[str, Any]) -> None:
    """Replace a state machine's {"Fn::Join": [sep, [str, ...]]} definition by the string it joins to.

    SAM writes an inline definition as one Fn::Join of its lines (1,700+ of them for the pipeline), and
    cfn-lint 1.58 exceeds Python's recursion limit validating a Join that long. Joined it is the same value.
    """
    for resource in template.get("Resources", {}).values():
        properties = resource.get("Properties", {})
        join = properties.get("DefinitionString", {})
        if isinstance(join, dict) and list(join) == ["Fn::Join"]:
            separator, parts = join["Fn::Join"]
            if all(isinstance(part, str) for part in parts):
                properties["DefinitionString"] = separator.join(parts)


def main(path: str) -> int:
    template = json.loads(Path(path).read_text())
    _join_definitions(template)
    succeed_states = _succeed_states(template)
    matches = lint(json.dumps(template, indent=1), config=ManualArgs(regions=[REGION]))
    findings, excused = [], []
    for match in matches:
        known = [
            reason
            for rule, pattern, reason in KNOWN_DEFECTS
            if match.rule.id == rule
            and (found := pattern.search(match.message))
            and found.group("state") in succeed_states
        ]
        (excused if known else findings).append(match)
    for match in findings:
        print(f"{match.rule.id} {match.message}\n  at {'/'.join(map(str, match.path))}", file=sys.stderr)
    for rule, _pattern, reason in KNOWN_DEFECTS:
        count = sum(1 for match in excused if match.rule.id == rule)
        if count:
            print(f"  ignored {count} x {rule}: {reason}")
    print(f"cfn-lint {__version__} on {path}: {len(findings)} findings, {len(excused)} known false positives")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".aws-sam/transformed.json"))
