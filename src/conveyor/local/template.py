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


class _NoValue:
    """`!Ref AWS::NoValue`: the property it stands for is left out, as CloudFormation does."""


NO_VALUE = _NoValue()


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
            if "Condition" in spec and not self.condition(spec["Condition"]):
                continue  # CloudFormation does not create it with these parameters
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
        if kind == "AWS::KMS::Key":
            return {"Ref": "", "Arn": ""}  # KMS chooses the key id: known once created
        if kind == "AWS::CloudWatch::Dashboard" and "DashboardName" in props:
            return {"Ref": self.resolve(props["DashboardName"])}
        return {"Ref": generated}

    def of_type(self, kind: str) -> list[Resource]:
        return [r for r in self.resources.values() if r.type == kind]

    # ------------------------------------------------------------------ intrinsics
    def resolve(self, value: Any) -> Any:
        """Resolve Ref, Fn::GetAtt, Fn::Sub, Fn::If, Fn::Select, Fn::Split and Fn::FindInMap (the intrinsics
        conveyor's template uses); a property whose value is `AWS::NoValue` is left out."""
        if isinstance(value, list):
            return [v for v in (self.resolve(v) for v in value) if v is not NO_VALUE]
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
            if key == "Fn::Select":
                index, items = arg
                return self.resolve(items)[int(self.resolve(index))]
            if key == "Fn::Split":
                delimiter, text = arg
                return str(self.resolve(text)).split(delimiter)
            if key == "Fn::FindInMap":
                mapping, top, second = (self.resolve(v) for v in arg)
                return self.template["Mappings"][mapping][top][second]
            if key.startswith("Fn::"):
                raise NotImplementedError(
                    f"local mode does not resolve {key}; keep the template to those resolve() knows"
                )
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not NO_VALUE}

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

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
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

    def bucket_encryption(self, bucket: Resource) -> dict[str, Any] | None:
        """PutBucketEncryption's ServerSideEncryptionConfiguration for `bucket`, or None: CloudFormation
        spells the API's Rules[].ApplyServerSideEncryptionByDefault differently."""
        if "BucketEncryption" not in bucket.properties:
            return None
        rules = []
        for rule in self.resolve(bucket.properties["BucketEncryption"])["ServerSideEncryptionConfiguration"]:
            api_rule: dict[str, Any] = {
                "ApplyServerSideEncryptionByDefault": rule["ServerSideEncryptionByDefault"]
            }
            if "BucketKeyEnabled" in rule:
                api_rule["BucketKeyEnabled"] = rule["BucketKeyEnabled"]
            rules.append(api_rule)
        return {"Rules": rules}

    def queue_attributes(self, queue: Resource) -> dict[str, str]:
        """CreateQueue's attributes for `queue` (its redrive target must exist: create dead-letter queues first)."""
        props = self.resolve(queue.properties)
        attributes = {
            key: str(props[key]).lower() if isinstance(props[key], bool) else str(props[key])
            for key in (
                "VisibilityTimeout",
                "MessageRetentionPeriod",
                "KmsMasterKeyId",
                "SqsManagedSseEnabled",
            )
            if key in props
        }
        if "RedrivePolicy" in props:
            attributes["RedrivePolicy"] = json.dumps(props["RedrivePolicy"])
        return attributes

    def topic_attributes(self, topic: Resource) -> dict[str, str]:
        props = self.resolve(topic.properties)
        return {"KmsMasterKeyId": str(props["KmsMasterKeyId"])} if "KmsMasterKeyId" in props else {}

    def create_keys(self, kms: Any) -> None:
        """Create the template's KMS keys and aliases through `kms`; KMS names a key, so the resources that
        refer to one resolve only after this."""
        for key in self.of_type("AWS::KMS::Key"):
            props = self.resolve(key.properties)
            metadata = kms.create_key(
                Description=props.get("Description", ""), Policy=json.dumps(props["KeyPolicy"])
            )["KeyMetadata"]
            if props.get("EnableKeyRotation"):
                kms.enable_key_rotation(KeyId=metadata["KeyId"])
            key.attributes.update(Ref=metadata["KeyId"], Arn=metadata["Arn"])
        for alias in self.of_type("AWS::KMS::Alias"):
            props = self.resolve(alias.properties)
            kms.create_alias(AliasName=props["AliasName"], TargetKeyId=props["TargetKeyId"])
            alias.attributes["Ref"] = props["AliasName"]

    def outputs(self) -> dict[str, str]:
        return {
            name: str(self.resolve(spec["Value"]))
            for name, spec in self.template.get("Outputs", {}).items()
            if "Condition" not in spec or self.condition(spec["Condition"])
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
