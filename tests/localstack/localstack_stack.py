"""Deploy the parts of conveyor's stack that LocalStack offers here, read from template.yaml (never restated).

What LocalStack (community, no Docker) runs on this machine: S3, SQS, SNS, IAM, KMS, EventBridge and Step
Functions. So the stack key (EncryptionMode SSE-KMS), the buckets (versioning, encryption, public access
block, the RawBucket → IngestQueue notification), the queues (the ingest queue's redrive to its DLQ, its queue
policy), the notification topic, the template's IAM roles with their inline policies, and the state machine with its DefinitionSubstitutions resolved by
`conveyor.local.template.Stack`, as local mode and CloudFormation resolve them. Functions, the HTTP API and
SAM's generated roles are not deployed: docs/localstack.md says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from conveyor.local.template import Stack


@dataclass
class Deployed:
    """Physical identities of what was created, by logical id."""

    buckets: dict[str, str] = field(default_factory=dict)  # name
    queues: dict[str, str] = field(default_factory=dict)  # URL
    topics: dict[str, str] = field(default_factory=dict)  # ARN
    roles: dict[str, str] = field(default_factory=dict)  # ARN
    state_machines: dict[str, str] = field(default_factory=dict)  # ARN
    keys: dict[str, str] = field(default_factory=dict)  # ARN


def deploy(stack: Stack, session: Any) -> Deployed:
    """Create the stack's S3, SQS, SNS, IAM and Step Functions resources through `session`'s clients."""
    s3, sqs, sns, iam, sfn = (session.client(s) for s in ("s3", "sqs", "sns", "iam", "stepfunctions"))
    deployed = Deployed()
    # The stack key (EncryptionMode SSE-KMS, the default) first: buckets, queues and the topic name it.
    stack.create_keys(session.client("kms"))
    deployed.keys = {key.logical_id: key.attributes["Arn"] for key in stack.of_type("AWS::KMS::Key")}
    for bucket in stack.of_type("AWS::S3::Bucket"):
        name, props = bucket.attributes["Ref"], bucket.properties
        s3.create_bucket(Bucket=name)
        if props.get("VersioningConfiguration", {}).get("Status") == "Enabled":
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        encryption = stack.bucket_encryption(bucket)
        if encryption:
            s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration=encryption)
        if "PublicAccessBlockConfiguration" in props:
            s3.put_public_access_block(
                Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"]
            )
        deployed.buckets[bucket.logical_id] = name

    # Dead-letter queues first: a redrive policy names its target.
    for queue in sorted(stack.of_type("AWS::SQS::Queue"), key=lambda q: "RedrivePolicy" in q.properties):
        attributes = stack.queue_attributes(queue)
        url = sqs.create_queue(QueueName=queue.attributes["QueueName"], Attributes=attributes)["QueueUrl"]
        queue.attributes["Ref"] = url  # the stack resolves !Ref <queue> to its URL from now on
        deployed.queues[queue.logical_id] = url
    for policy in stack.of_type("AWS::SQS::QueuePolicy"):
        document = json.dumps(stack.resolve(policy.properties["PolicyDocument"]))
        for url in stack.resolve(policy.properties["Queues"]):
            sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": document})

    for topic in stack.of_type("AWS::SNS::Topic"):
        arn = sns.create_topic(Name=topic.attributes["TopicName"], Attributes=stack.topic_attributes(topic))[
            "TopicArn"
        ]
        deployed.topics[topic.logical_id] = arn

    for role in stack.of_type("AWS::IAM::Role"):
        props = stack.resolve(role.properties)
        name = role.attributes["Ref"]
        arn = iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(props["AssumeRolePolicyDocument"]),
            Description=props.get("Description", ""),
        )["Role"]["Arn"]
        for policy in props.get("Policies", []):
            iam.put_role_policy(
                RoleName=name,
                PolicyName=policy["PolicyName"],
                PolicyDocument=json.dumps(policy["PolicyDocument"]),
            )
        for managed in props.get("ManagedPolicyArns", []):
            iam.attach_role_policy(RoleName=name, PolicyArn=managed)
        deployed.roles[role.logical_id] = arn

    # SAM generates the state machine's role from its Policies; LocalStack community does not enforce IAM,
    # so the execution role only has to exist and trust Step Functions.
    states_role = iam.create_role(
        RoleName=f"{stack.stack_name}-localstack-states",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "states.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            }
        ),
    )["Role"]["Arn"]
    for machine in stack.of_type("AWS::Serverless::StateMachine"):
        arn = sfn.create_state_machine(
            name=machine.attributes["Name"],
            definition=stack.state_machine_definition(machine.logical_id),
            roleArn=states_role,
            type=machine.properties.get("Type", "STANDARD"),
        )["stateMachineArn"]
        deployed.state_machines[machine.logical_id] = arn

    # Notifications last: S3 checks that the queue exists (and sends it an s3:TestEvent).
    for bucket in stack.of_type("AWS::S3::Bucket"):
        configurations = [
            {
                "QueueArn": stack.resolve(c["Queue"]),
                "Events": [c["Event"]],
                "Filter": {"Key": {"FilterRules": c["Filter"]["S3Key"]["Rules"]}},
            }
            for c in bucket.properties.get("NotificationConfiguration", {}).get("QueueConfigurations", [])
        ]
        if configurations:
            s3.put_bucket_notification_configuration(
                Bucket=bucket.attributes["Ref"],
                NotificationConfiguration={"QueueConfigurations": configurations},
            )
    return deployed
