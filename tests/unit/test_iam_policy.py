"""No IAM wildcard in the deployed stack goes unreviewed.

The template is expanded by aws-sam-translator, the code of CloudFormation's AWS::Serverless transform
(scripts/transform_template.py, offline), so SAM's policy templates, its generated function and state machine roles and the hand-written roles are
all checked. A statement with a wildcard resource or action must match an entry of iam_wildcards.yaml,
which says why; docs/security.md says how to review one.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALLOW_LIST = yaml.safe_load((Path(__file__).parent / "iam_wildcards.yaml").read_text())

_spec = importlib.util.spec_from_file_location(
    "transform_template", ROOT / "scripts" / "transform_template.py"
)
assert _spec and _spec.loader
transform_template = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(transform_template)

# Resources whose PolicyDocument grants permissions to a principal named elsewhere (identity policies), and
# resource policies, whose statements name a principal.
IDENTITY_POLICY_TYPES = {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}
RESOURCE_POLICY_TYPES = {
    "AWS::SQS::QueuePolicy",
    "AWS::SNS::TopicPolicy",
    "AWS::S3::BucketPolicy",
}


@dataclass(frozen=True)
class Statement:
    """One statement of one policy, intrinsics rendered as the template writes them (${Name})."""

    owner: str  # the role (or policy resource) it belongs to
    policy: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    not_action: bool
    not_resource: bool
    principals: tuple[str, ...]


def render(value: Any) -> str:
    """A policy value as one string: Fn::Sub kept as written, Ref as ${X}, Fn::GetAtt as ${X.Attr}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((function, argument),) = value.items()
        if function == "Ref":
            return "${" + argument + "}"
        if function == "Fn::GetAtt":
            return "${" + ".".join(argument) + "}"
        if function == "Fn::Sub":
            if isinstance(argument, str):
                return argument
            text, variables = argument
            for name, variable in variables.items():
                text = text.replace("${" + name + "}", render(variable))
            return text
        if function == "Fn::Join":
            separator, parts = argument
            return separator.join(render(part) for part in parts)
    raise AssertionError(f"cannot read a policy value written as {value!r}")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _principals(statement: dict[str, Any]) -> tuple[str, ...]:
    principal = statement.get("Principal", {})
    if principal == "*":
        return ("*",)
    return tuple(render(p) for values in principal.values() for p in _as_list(values))


def _statements(owner: str, policy: str, document: dict[str, Any]) -> list[Statement]:
    found = []
    for statement in _as_list(document.get("Statement", [])):
        if statement.get("Effect") != "Allow":
            continue
        found.append(
            Statement(
                owner=owner,
                policy=policy,
                actions=tuple(_as_list(statement.get("Action", statement.get("NotAction", [])))),
                resources=tuple(
                    render(r) for r in _as_list(statement.get("Resource", statement.get("NotResource", [])))
                ),
                not_action="NotAction" in statement,
                not_resource="NotResource" in statement,
                principals=_principals(statement),
            )
        )
    return found


def iam_statements(template: dict[str, Any]) -> list[Statement]:
    """Every Allow statement of every identity policy in a CloudFormation template."""
    found = []
    for logical_id, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Role":
            for policy in properties.get("Policies", []):
                found += _statements(logical_id, policy["PolicyName"], policy["PolicyDocument"])
        elif resource["Type"] in IDENTITY_POLICY_TYPES:
            owners = [render(role) for role in properties.get("Roles", [])] or [logical_id]
            for owner in owners:
                found += _statements(owner.strip("${}"), logical_id, properties["PolicyDocument"])
    return found


def resource_policy_statements(template: dict[str, Any]) -> list[Statement]:
    found = []
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] in RESOURCE_POLICY_TYPES:
            found += _statements(logical_id, logical_id, resource["Properties"]["PolicyDocument"])
    return found


_INTRINSIC = re.compile(r"\$\{[^}]*\}")


def is_wildcard_resource(resource: str) -> bool:
    """`*`, a wildcard in an ARN's partition, service, region or account, or a resource name that is all wildcard.

    `arn:...:training-job/*` is a wildcard (any training job); `arn:...:endpoint/${AWS::StackName}-*` and
    `${Bucket.Arn}/*` (the objects of one bucket) are not: a fixed part names what they reach.
    """
    if resource == "*":
        return True
    if not resource.startswith("arn:"):
        return resource.startswith("*")
    fields = _INTRINSIC.sub("X", resource).split(":", 5)
    if len(fields) < 6:
        return True
    _arn, partition, service, region, account, name = fields
    if any("*" in part for part in (partition, service, region, account)):
        return True
    if service == "s3":  # no resource type: the name is the bucket, then the key
        return name.startswith("*")
    kind = re.match(r"[^/:]*[/:]?", name)
    remainder = name[kind.end() :] if kind and kind.group().endswith(("/", ":")) else name
    return remainder.startswith("*")


def is_wildcard_action(action: str) -> bool:
    """`*`, `service:*`, or a prefix such as `s3:Get*`."""
    return "*" in action or "?" in action


def wildcards(statements: list[Statement]) -> list[tuple[str, tuple[str, ...], str]]:
    """(owner, actions, resource) for each wildcard resource, and for each resource of a wildcard action."""
    found = []
    for statement in statements:
        broad_actions = statement.not_action or any(is_wildcard_action(a) for a in statement.actions)
        for resource in statement.resources or ("<none>",):
            if broad_actions or statement.not_resource or is_wildcard_resource(resource):
                found.append((statement.owner, statement.actions, resource))
    return found


def unreviewed(template: dict[str, Any]) -> list[str]:
    """Wildcards that no allow-list entry covers, as readable lines (none: every one is reviewed)."""
    reviewed = {
        (entry["role"], frozenset(entry["actions"]), entry["resource"]) for entry in ALLOW_LIST["statements"]
    }
    problems = [
        f"{owner}: {', '.join(actions)} on {resource}"
        for owner, actions, resource in wildcards(iam_statements(template))
        if (owner, frozenset(actions), resource) not in reviewed
    ]
    managed = {entry["arn"] for entry in ALLOW_LIST["managed_policies"]}
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] == "AWS::IAM::Role":
            for arn in resource["Properties"].get("ManagedPolicyArns", []):
                if render(arn) not in managed:
                    problems.append(
                        f"{logical_id}: managed policy {render(arn)} (its statements are not here)"
                    )
    return problems


def transformed(sam_template: dict[str, Any]) -> dict[str, Any]:
    return transform_template.transform(sam_template, base_dir=ROOT)


@pytest.fixture(scope="module")
def sam_template():
    return transform_template.load_sam_template(ROOT / "template.yaml")


@pytest.fixture(scope="module")
def template(sam_template):
    return transformed(sam_template)


def test_every_role_is_read(template):
    """The check sees the hand-written role and every role SAM generates (functions, state machine)."""
    roles = {r for r, spec in template["Resources"].items() if spec["Type"] == "AWS::IAM::Role"}
    assert {
        "SageMakerExecutionRole",
        "PipelineRole",
        "PreprocessFunctionRole",
        "EvaluateFunctionRole",
    } <= roles
    # Each role with an inline policy (all of conveyor's) is an owner of statements; none is missed.
    owners = {s.owner for s in iam_statements(template)}
    assert owners == {r for r in roles if template["Resources"][r]["Properties"].get("Policies")}
    assert {"SageMakerExecutionRole", "PipelineRole", "PreprocessFunctionRole"} <= owners
    # SAM's policy templates are expanded, not opaque: StepFunctionsExecutionPolicy becomes states:StartExecution.
    assert any("states:StartExecution" in s.actions for s in iam_statements(template))


def test_no_unreviewed_iam_wildcards(template):
    assert unreviewed(template) == []


def test_every_allow_list_entry_is_needed_and_explained(template):
    found = {
        (owner, frozenset(actions), resource)
        for owner, actions, resource in wildcards(iam_statements(template))
    }
    for entry in ALLOW_LIST["statements"]:
        assert len(entry["reason"].split()) >= 5, entry
        assert (entry["role"], frozenset(entry["actions"]), entry["resource"]) in found, (
            f"stale entry: {entry}"
        )
    used = {
        arn
        for spec in template["Resources"].values()
        if spec["Type"] == "AWS::IAM::Role"
        for arn in spec["Properties"].get("ManagedPolicyArns", [])
    }
    for entry in ALLOW_LIST["managed_policies"]:
        assert entry["reason"].strip() and entry["arn"] in used, entry


def test_resource_policies_name_their_principals(template):
    """The queue policy (and any other resource policy) grants to named services, never to "*"."""
    for statement in resource_policy_statements(template):
        assert statement.principals and "*" not in statement.principals, statement
        assert not any(is_wildcard_resource(r) for r in statement.resources), statement


def test_every_star_resource_in_the_template_says_why():
    """Each `Resource: "*"` in template.yaml has a comment (or a Sid) a reviewer can read next to it."""
    lines = (ROOT / "template.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.fullmatch(r'\s*Resource: "\*"', line):
            context = lines[max(0, number - 4) : number]
            assert any(text.strip().startswith("#") for text in context), f"template.yaml:{number + 1}"


@pytest.mark.parametrize(
    ("case", "statement", "expected"),
    [
        (
            "wildcard resource",
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
            "EvaluateFunctionRole: s3:GetObject on *",
        ),
        (
            "wildcard action",
            {
                "Effect": "Allow",
                "Action": "sagemaker:*",
                "Resource": {"Fn::GetAtt": ["ArtifactsBucket", "Arn"]},
            },
            "EvaluateFunctionRole: sagemaker:* on ${ArtifactsBucket.Arn}",
        ),
        (
            "prefix action",
            {"Effect": "Allow", "Action": "s3:Get*", "Resource": {"Fn::Sub": "${ArtifactsBucket.Arn}/*"}},
            "EvaluateFunctionRole: s3:Get* on ${ArtifactsBucket.Arn}/*",
        ),
        (
            "any resource name of a type",
            {
                "Effect": "Allow",
                "Action": "sagemaker:DeleteEndpoint",
                "Resource": {
                    "Fn::Sub": "arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/*"
                },
            },
            "EvaluateFunctionRole: sagemaker:DeleteEndpoint on "
            "arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/*",
        ),
        (
            "allow-listed action on another role",
            {"Effect": "Allow", "Action": "sagemaker:ListEndpoints", "Resource": "*"},
            "EvaluateFunctionRole: sagemaker:ListEndpoints on *",
        ),
    ],
)
def test_a_new_wildcard_statement_fails_the_check(sam_template, case, statement, expected):
    mutated = copy.deepcopy(sam_template)
    mutated["Resources"]["EvaluateFunction"]["Properties"]["Policies"].append({"Statement": [statement]})
    assert unreviewed(transformed(mutated)) == [expected], case


def test_a_new_role_with_a_wildcard_fails_the_check(sam_template):
    mutated = copy.deepcopy(sam_template)
    role = copy.deepcopy(mutated["Resources"]["SageMakerExecutionRole"])
    role["Properties"]["Policies"] = [
        {
            "PolicyName": "too-broad",
            "PolicyDocument": {
                "Statement": [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::*"}]
            },
        }
    ]
    role["Properties"]["ManagedPolicyArns"] = ["arn:aws:iam::aws:policy/AmazonSageMakerFullAccess"]
    mutated["Resources"]["AnotherRole"] = role
    assert unreviewed(transformed(mutated)) == [
        "AnotherRole: s3:PutObject on arn:aws:s3:::*",
        "AnotherRole: managed policy arn:aws:iam::aws:policy/AmazonSageMakerFullAccess (its statements are not here)",
    ]


@pytest.mark.parametrize(
    ("resource", "wildcard"),
    [
        ("*", True),
        ("arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:training-job/*", True),
        ("arn:aws:s3:::*", True),
        ("arn:aws:ecr:*:763104351884:repository/pytorch-training", True),
        ("arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:*", True),
        (
            "arn:${AWS::Partition}:sagemaker:${AWS::Region}:${AWS::AccountId}:endpoint/${AWS::StackName}-*",
            False,
        ),
        ("arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:/aws/sagemaker/*", False),
        ("arn:${AWS::Partition}:states:${AWS::Region}:${AWS::AccountId}:execution:${Pipeline.Name}:*", False),
        ("${ArtifactsBucket.Arn}/*", False),
        ("${ArtifactsBucket.Arn}", False),
        ("arn:${AWS::Partition}:s3:::${ProcessedBucket}/*", False),
    ],
)
def test_what_counts_as_a_wildcard_resource(resource, wildcard):
    assert is_wildcard_resource(resource) is wildcard
