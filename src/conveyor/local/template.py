"""template.yaml as local mode sees it: resources, physical names, and intrinsic functions resolved.

Local mode never restates a bucket, a queue, an environment variable or a substitution in Python: it
reads them here, so a change to the template is a change to local mode (tests/unit/test_parity.py).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ACCOUNT_ID = "123456789012"
REGION = "us-east-1"


class _CfnLoader(yaml.SafeLoader):
    """YAML loader that turns CloudFormation short forms (!Ref, !Sub, !GetAtt ...) into long forms."""


def _construct_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix in ("Ref", "Condition"):
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _construct_tag)


def load_template(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        document: dict[str, Any] = yaml.load(handle, Loader=_CfnLoader)
    return document


@dataclass
class Resource:
    """One resource of the template, with its local physical identity."""

    logical_id: str
    type: str
    properties: dict[str, Any]
    attributes: dict[str, str] = field(default_factory=dict)  # "Ref", "Arn", "Name", ...


_SUB = re.compile(r"\$\{([^}]+)\}")


class Stack:
    """The template with local physical names for every resource and a resolver for intrinsics."""

    def __init__(
        self,
        root: Path,
        stack_name: str = "conveyor",
        parameters: dict[str, str] | None = None,
        account_id: str = ACCOUNT_ID,
        region: str = REGION,
    ) -> None:
        self.root = root
        self.template = load_template(root / "template.yaml")
        self.stack_name = stack_name
        self.account_id = account_id
        self.region = region
        self.parameters = {
            name: str(spec.get("Default", "")) for name, spec in self.template.get("Parameters", {}).items()
        }
        self.parameters.update(parameters or {})
        self.pseudo = {
            "AWS::StackName": stack_name,
            "AWS::AccountId": account_id,
            "AWS::Region": region,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        globals_ = self.template.get("Globals", {}).get("Function", {})
        self.resources: dict[str, Resource] = {}
        for logical_id, spec in self.template["Resources"].items():
            properties = copy.deepcopy(spec.get("Properties", {}))
            if spec["Type"] == "AWS::Serverless::Function":
                properties = _merge_globals(globals_, properties)
            self.resources[logical_id] = Resource(logical_id, spec["Type"], properties)
        for resource in self.resources.values():
            resource.attributes = self._identity(resource)

    # ------------------------------------------------------------------ naming
    def _identity(self, resource: Resource) -> dict[str, str]:
        logical_id, kind, props = resource.logical_id, resource.type, resource.properties
        generated = f"{self.stack_name}-{logical_id}"
        account, region = self.account_id, self.region
        if kind == "AWS::S3::Bucket":
            name = self.resolve(props["BucketName"]) if "BucketName" in props else generated.lower()
            return {"Ref": name, "Arn": f"arn:aws:s3:::{name}", "DomainName": f"{name}.s3.amazonaws.com"}
        if kind == "AWS::SQS::Queue":
            arn = f"arn:aws:sqs:{region}:{account}:{generated}"
            return {"Ref": "", "Arn": arn, "QueueName": generated}  # Ref (the URL) is known once created
        if kind == "AWS::SNS::Topic":
            arn = f"arn:aws:sns:{region}:{account}:{generated}"
            return {"Ref": arn, "TopicArn": arn, "TopicName": generated}
        if kind == "AWS::IAM::Role":
            return {"Ref": generated, "Arn": f"arn:aws:iam::{account}:role/{generated}", "RoleId": generated}
        if kind == "AWS::Serverless::Function":
            return {"Ref": generated, "Arn": f"arn:aws:lambda:{region}:{account}:function:{generated}"}
        if kind == "AWS::Serverless::StateMachine":
            arn = f"arn:aws:states:{region}:{account}:stateMachine:{generated}"
            return {"Ref": arn, "Arn": arn, "Name": generated}
        if kind == "AWS::Serverless::HttpApi":
            return {"Ref": "local"}
        if kind == "AWS::CloudWatch::Dashboard" and "DashboardName" in props:
            return {"Ref": self.resolve(props["DashboardName"])}
        return {"Ref": generated}

    def of_type(self, kind: str) -> list[Resource]:
        return [r for r in self.resources.values() if r.type == kind]

    # ------------------------------------------------------------------ intrinsics
    def resolve(self, value: Any) -> Any:
        """Resolve Ref, Fn::GetAtt, Fn::Sub and Fn::If (the intrinsics conveyor's template uses)."""
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(arg)
            if key == "Fn::GetAtt":
                return self._get_att(arg[0], arg[1])
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::If":
                condition, if_true, if_false = arg
                return self.resolve(if_true if self.condition(condition) else if_false)
            if key.startswith("Fn::"):
                raise NotImplementedError(
                    f"local mode does not resolve {key}; keep the template to Ref/GetAtt/Sub/If"
                )
        return {k: self.resolve(v) for k, v in value.items()}

    def condition(self, name: str) -> bool:
        """A template condition, evaluated with the stack's parameters."""
        return self._evaluate(self.template["Conditions"][name])

    def _evaluate(self, expression: Any) -> bool:
        ((function, arg),) = expression.items()
        if function == "Fn::Equals":
            left, right = (str(self.resolve(v)) for v in arg)
            return left == right
        if function == "Fn::Not":
            return not self._evaluate(arg[0])
        if function == "Fn::And":
            return all(self._evaluate(e) for e in arg)
        if function == "Fn::Or":
            return any(self._evaluate(e) for e in arg)
        if function == "Condition":
            return self.condition(arg)
        raise NotImplementedError(f"local mode does not evaluate {function} in a condition")

    def _ref(self, name: str) -> str:
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        return self.resources[name].attributes["Ref"]

    def _get_att(self, logical_id: str, attribute: str) -> str:
        attributes = self.resources[logical_id].attributes
        if attribute not in attributes:
            raise KeyError(f"local mode has no attribute {attribute} of {logical_id}")
        return attributes[attribute]

    def _sub(self, arg: str | list[Any]) -> str:
        template, variables = (arg, {}) if isinstance(arg, str) else (arg[0], self.resolve(arg[1]))

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name and not name.startswith("AWS::"):
                logical_id, attribute = name.split(".", 1)
                return self._get_att(logical_id, attribute)
            return str(self._ref(name))

        return _SUB.sub(replace, template)

    # ------------------------------------------------------------------ views
    def function_environment(self, logical_id: str) -> dict[str, str]:
        props = self.resources[logical_id].properties
        variables = props.get("Environment", {}).get("Variables", {})
        return {k: str(self.resolve(v)) for k, v in variables.items()}

    def state_machine_definition(self, logical_id: str) -> str:
        """The ASL file with DefinitionSubstitutions filled, as CloudFormation would."""
        props = self.resources[logical_id].properties
        text = (self.root / props["DefinitionUri"]).read_text()
        substitutions = {k: str(self.resolve(v)) for k, v in props.get("DefinitionSubstitutions", {}).items()}
        missing = sorted(set(_SUB.findall(text)) - set(substitutions))
        if missing:
            raise KeyError(
                f"{props['DefinitionUri']} uses substitutions the template does not define: {missing}"
            )
        text = _SUB.sub(lambda m: substitutions[m.group(1)], text)
        json.loads(text)  # a substitution must not break the JSON
        return text

    def outputs(self) -> dict[str, str]:
        return {
            name: str(self.resolve(spec["Value"])) for name, spec in self.template.get("Outputs", {}).items()
        }


def _merge_globals(globals_: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(globals_)
    for key, value in properties.items():
        if key == "Environment":
            variables = {**merged.get("Environment", {}).get("Variables", {}), **value.get("Variables", {})}
            merged["Environment"] = {"Variables": variables}
        else:
            merged[key] = value
    return merged
