"""`berth render k8s`: the same EAS JSON as Kubernetes manifests, with `berth boot` still the entrypoint.

One module per part: `workload` (Deployment, ConfigMap, Service, PodDisruptionBudget),
`storage` (volumes), `secrets`, `route` (Gateway API HTTPRoute), `scaling` (KEDA
ScaledObject), `checks` (what schema validation cannot see), `render` (all of them for a set of
files, and deterministic YAML), `cli` (the command).
"""
