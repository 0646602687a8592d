"""Code shared by every conveyor Lambda function (shipped in each package via CodeUri: functions/)."""
