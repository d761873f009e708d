"""`berth render k8s FILE... [--group GROUP.json ...]`: Kubernetes manifests from EAS JSON.

Registration imports nothing heavy; the renderer (PyYAML, the agent's modules) loads when the
command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.k8s.model import DEFAULT_GATEWAY, DEFAULT_NAMESPACE, DEFAULT_NODE_CACHE, DEFAULT_PROMETHEUS

DESCRIPTION = """\
Render EAS-style service configs as Kubernetes manifests, with `berth boot` still the
container's entrypoint: per service a Deployment (probes on berth boot's /ready and /live,
resources, /dev/shm, the node cache), its spec in a ConfigMap (BERTH_SPEC), Secrets for the
token, secret-named env values and dockerAuth, a Service, a PodDisruptionBudget, a KEDA
ScaledObject for autoscaler/cronscaler, and a Gateway API HTTPRoute at /api/predict/NAME;
each --group file (or metadata.group) renders one route with weights, mirrors and header
matches.

Output: one multi-document YAML stream on stdout, or one file per object in -o DIR. The same
input gives the same bytes. Errors name the file and JSON path (exit 2); what does not map
is printed as a warning on stderr. docs/kubernetes.md says what to install on the cluster.
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    render = subparsers.add_parser("render", help="render service configs for another engine (k8s)")
    targets = render.add_subparsers(dest="render_target", metavar="TARGET")
    targets.required = True
    k8s = targets.add_parser("k8s", help="Kubernetes manifests (Deployment, Service, KEDA, Gateway API)",
                             description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    k8s.add_argument("files", nargs="+", metavar="FILE", help="EAS-style JSON service configs")
    k8s.add_argument("--group", action="append", default=[], metavar="GROUP.json",
                     help="a service group file (repeatable): one HTTPRoute over its members")
    k8s.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE, metavar="NS",
                     help=f"namespace of every object and of the Prometheus queries ({DEFAULT_NAMESPACE!r})")
    k8s.add_argument("--gateway", default=DEFAULT_GATEWAY, metavar="NAME",
                     help=f"the Gateway the HTTPRoutes attach to ({DEFAULT_GATEWAY})")
    k8s.add_argument("--prometheus", default=DEFAULT_PROMETHEUS, metavar="URL",
                     help=f"the Prometheus KEDA's triggers query ({DEFAULT_PROMETHEUS})")
    k8s.add_argument("--node-cache", default=str(DEFAULT_NODE_CACHE), metavar="DIR",
                     help=f"the node cache on each node, mounted per service by hostPath ({DEFAULT_NODE_CACHE})")
    k8s.add_argument("--storage-secret", metavar="NAME",
                     help="the Secret with the object store's keys (OSS_ACCESS_KEY_ID ... or AWS_ACCESS_KEY_ID ...), "
                          "referenced, never rendered (default SERVICE-storage)")
    k8s.add_argument("--gpu-share", choices=("none", "hami", "ack"), default="none",
                     help="how metadata.gpu_memory (a share of one GPU) maps: none, a whole nvidia.com/gpu: 1 and a "
                          "warning (Kubernetes alone hands out whole GPUs); hami, HAMi's nvidia.com/gpu: 1 + "
                          "nvidia.com/gpumem (MiB) + nvidia.com/gpucores; ack, ACK gpushare's aliyun.com/gpu-mem (GiB) "
                          "(default none)")
    k8s.add_argument("-o", "--output", metavar="DIR", help="write one file per object here instead of stdout")
    k8s.set_defaults(handler=run_render)


def run_render(args: argparse.Namespace) -> int:
    from agent.k8s.model import Options
    from agent.k8s.render import render_files, to_stream, write_files

    options = Options(namespace=args.namespace, gateway=args.gateway, prometheus=args.prometheus,
                      node_cache=Path(args.node_cache), storage_secret=args.storage_secret, gpu_share=args.gpu_share)
    rendered = render_files(args.files, args.group, options)
    for warning in rendered.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.output:
        written = write_files(rendered.manifests, Path(args.output))
        print(f"wrote {len(written)} files to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(to_stream(rendered.manifests))
    return 0
