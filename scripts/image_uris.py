"""The AWS Deep Learning Container images of template.yaml, resolved with the SageMaker Python SDK.

The registry account of the PyTorch images differs by region (763104351884 in most, others in opt-in and
China regions), so the template looks it up in its ``DeepLearningContainers`` mapping. This tool keeps
that mapping true to the SDK's own image table (``sagemaker.image_uris.retrieve``), the way the SDK would
resolve the images for an estimator; it runs in tooling only, never in a Lambda function.

    .tools/sagemaker/bin/python scripts/image_uris.py --check   # make lint-infra: exit 1 on any difference
    .tools/sagemaker/bin/python scripts/image_uris.py --write   # rewrite the mapping in template.yaml

For every region the SDK knows for the template's default ``PyTorchImageVersion`` it checks that the
mapping has the region, with the account of all four images (training on GPU and CPU, inference on CPU and GPU),
and that the template's image names give exactly the SDK's URIs.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "template.yaml"
MAPPING = "DeepLearningContainers"
PY_VERSION = "py311"
# (what the template names the image, the SDK's image scope, an instance type of the processor it runs on);
# InferenceImage is an Fn::If on the endpoint's instance type: ":gpu" names its GPU branch.
IMAGES = (
    ("TrainingImage", "training", "ml.g5.xlarge"),
    ("ProcessingImage", "training", "ml.m5.xlarge"),
    ("InferenceImage", "inference", "ml.m5.large"),
    ("InferenceImage:gpu", "inference", "ml.g5.xlarge"),
)
BEGIN, END = f"  {MAPPING}:", "\n\n"


class _Loader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags, each read as ``{"Fn::<Tag>": value}``."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_Loader.add_multi_constructor("!", _tagged)


def sdk_uris(version: str) -> dict[str, dict[str, str]]:
    """region → image name → URI, for every region the SDK has PyTorch `version` images in."""
    logging.disable(logging.INFO)  # the SDK's import logs each config file it does not find
    from sagemaker import image_uris

    logging.disable(logging.NOTSET)

    config = image_uris.config_for_framework("pytorch")
    regions: set[str] = set()
    for scope in ("training", "inference"):
        versions = config[scope]["versions"]
        resolved = versions.get(version) or versions.get(".".join(version.split(".")[:2]))
        if resolved is None:
            raise SystemExit(f"the SageMaker SDK has no PyTorch {version} {scope} image")
        regions |= set(resolved["registries"])
    return {
        region: {
            name: image_uris.retrieve(
                framework="pytorch",
                region=region,
                version=version,
                py_version=PY_VERSION,
                instance_type=instance_type,
                image_scope=scope,
            )
            for name, scope, instance_type in IMAGES
        }
        for region in sorted(regions)
    }


def template_uri(template: dict[str, Any], name: str, region: str, version: str) -> str:
    """The URI the template's ``name`` substitution gives in `region` (account from the mapping)."""
    substitutions = template["Resources"]["Pipeline"]["Properties"]["DefinitionSubstitutions"]
    base, _, branch = name.partition(":")
    value = substitutions[base]
    if "Fn::If" in value:  # [condition, when true (the GPU image), when false]
        value = value["Fn::If"][1 if branch == "gpu" else 2]
    text, variables = value["Fn::Sub"]
    account = template["Mappings"][MAPPING][region]["Account"]
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    values = {"AWS::Region": region, "AWS::URLSuffix": suffix, "PyTorchImageVersion": version}
    values.update({key: account for key in variables})
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(values[m.group(1)]), text)


def differences(template: dict[str, Any], uris: dict[str, dict[str, str]], version: str) -> list[str]:
    mapping = template.get("Mappings", {}).get(MAPPING, {})
    problems = []
    for region, images in uris.items():
        if region not in mapping:
            problems.append(f"{region}: missing from the {MAPPING} mapping")
            continue
        for name, expected in images.items():
            actual = template_uri(template, name, region, version)
            if actual != expected:
                problems.append(f"{region} {name}: the template gives {actual}, the SDK {expected}")
    problems += [
        f"{region}: in the mapping, unknown to the SDK" for region in sorted(set(mapping) - set(uris))
    ]
    return problems


def mapping_text(uris: dict[str, dict[str, str]]) -> str:
    lines = [BEGIN]
    for region, images in uris.items():
        (account,) = {uri.split(".", 1)[0] for uri in images.values()}
        lines.append(f'    {region}: {{Account: "{account}"}}')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="exit 1 when the template differs from the SDK")
    action.add_argument("--write", action="store_true", help="rewrite the mapping in template.yaml")
    args = parser.parse_args(argv)
    text = TEMPLATE.read_text()
    template = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    version = str(template["Parameters"]["PyTorchImageVersion"]["Default"])
    uris = sdk_uris(version)
    if args.write:
        start = text.index(BEGIN)
        end = text.index(END, start)
        TEMPLATE.write_text(text[:start] + mapping_text(uris) + text[end:])
        print(f"{TEMPLATE.name}: {MAPPING} has the {len(uris)} regions of PyTorch {version}")
        return 0
    problems = differences(template, uris, version)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"run {Path(__file__).name} --write to take the SDK's images", file=sys.stderr)
        return 1
    print(f"{TEMPLATE.name}: the images of PyTorch {version} match the SageMaker SDK in {len(uris)} regions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
