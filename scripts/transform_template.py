"""Translate template.yaml into the CloudFormation that SAM would deploy, offline and without credentials.

Usage: python scripts/transform_template.py [template.yaml] [--output .aws-sam/transformed.json]

The linters (cfn-lint, checkov) and tests/unit/test_iam_policy.py read the result: the roles, the expanded
SAM policy templates and the state machine definition as CloudFormation sees them. It runs
aws-sam-translator, the open-source code of CloudFormation's AWS::Serverless transform (the version
aws-sam-cli bundles), with local paths replaced the way `sam validate` replaces them, a fixed region and account, and the state machine definition inlined from its
ASL file so that cfn-lint checks it too.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import boto3
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator

ROOT = Path(__file__).resolve().parents[1]
# conveyor.local.template needs only PyYAML, which this virtualenv (aws-sam-cli's) has too; it gives the
# template reader and the fake identity local mode uses: nothing here talks to AWS.
sys.path.insert(0, str(ROOT / "src"))
from conveyor.local.template import ACCOUNT_ID, REGION, load_template  # noqa: E402

# What `sam validate` puts in place of a local CodeUri: the translator accepts only S3 locations.
PLACEHOLDER_CODE = "s3://conveyor-offline-transform/code.zip"
# The translator asks for AWS's list of managed policies (an IAM call) only when a template names a managed
# policy by name instead of by ARN. conveyor names none; an empty map keeps the transform offline, and a
# name that slips in stays a bare name in ManagedPolicyArns, which cfn-lint rejects as not an ARN.
MANAGED_POLICY_MAP: dict[str, str] = {}


def load_sam_template(path: Path) -> dict[str, Any]:
    """Read a SAM template written in YAML, short-form intrinsics included (local mode's reader)."""
    return load_template(path)


def _offline_ready(sam_template: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A copy of the template the translator accepts: S3 code and layer locations, and inline state machine
    definitions."""
    template = copy.deepcopy(sam_template)
    function_globals = template.get("Globals", {}).get("Function", {})
    if isinstance(function_globals.get("CodeUri"), str):
        function_globals["CodeUri"] = PLACEHOLDER_CODE
    for resource in template.get("Resources", {}).values():
        properties = resource.setdefault("Properties", {})
        if resource.get("Type") == "AWS::Serverless::Function" and isinstance(properties.get("CodeUri"), str):
            properties["CodeUri"] = PLACEHOLDER_CODE
        if resource.get("Type") == "AWS::Serverless::LayerVersion" and isinstance(
            properties.get("ContentUri"), str
        ):
            properties["ContentUri"] = PLACEHOLDER_CODE
        if resource.get("Type") == "AWS::Serverless::StateMachine" and isinstance(
            properties.get("DefinitionUri"), str
        ):
            definition_file = base_dir / properties.pop("DefinitionUri")
            properties["Definition"] = json.loads(definition_file.read_text())
    return template


def transform(sam_template: dict[str, Any], base_dir: Path = ROOT) -> dict[str, Any]:
    """The CloudFormation template SAM makes of `sam_template`, offline.

    Parameters
    ----------
    sam_template
        The SAM template as loaded by `load_sam_template` (it is not modified).
    base_dir
        The directory the template's relative paths (DefinitionUri) are relative to.

    Returns
    -------
    dict
        The translated template: no AWS::Serverless::* resources, every generated role spelled out.
    """
    translator = Translator(
        managed_policy_map=None,
        sam_parser=Parser(),
        plugins=[],
        # A session with a region and no credentials: the translator reads the partition from it, no more.
        boto_session=boto3.session.Session(region_name=REGION),
    )
    return translator.translate(
        sam_template=_offline_ready(sam_template, base_dir),
        parameter_values={"AWS::Region": REGION, "AWS::AccountId": ACCOUNT_ID},
        get_managed_policy_map=lambda: MANAGED_POLICY_MAP,
        passthrough_metadata=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template", nargs="?", default=str(ROOT / "template.yaml"), type=Path)
    parser.add_argument("--output", default=str(ROOT / ".aws-sam" / "transformed.json"), type=Path)
    args = parser.parse_args(argv)
    transformed = transform(load_sam_template(args.template), base_dir=args.template.resolve().parent)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(transformed, indent=2, sort_keys=True) + "\n")
    resources = transformed.get("Resources", {})
    roles = sum(1 for r in resources.values() if r.get("Type") == "AWS::IAM::Role")
    print(f"{args.output}: {len(resources)} resources ({roles} IAM roles) from {args.template}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
