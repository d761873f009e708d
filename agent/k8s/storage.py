"""Storage entries as pod volumes: the node cache, claims for FUSE, nfs, hostPath and emptyDir.

OSS/S3 in cache mode goes through the node cache exactly as on one node: `berth boot` fills
`<cache>/weights/services/<service>/` and points mount_path at it, so the pod mounts only this
service's part of the cache (cache.instance_paths: the paths the agent mounts), never another
service's weights. FUSE mode becomes a PersistentVolumeClaim bound to a CSI volume that the
cluster's OSS or S3 driver mounts, so the pod needs no /dev/fuse and no CAP_SYS_ADMIN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.k8s.model import Manifest, Options, metadata, object_name
from bootstrap import cache
from bootstrap.spec import ServiceSpec, Storage

# The CSI drivers a FUSE claim expects; each is named in the comment above the claim.
CSI_DRIVERS = {
    "oss": ("ossplugin.csi.alibabacloud.com", "Alibaba Cloud's OSS CSI plugin (ossfs)"),
    "s3": ("s3.csi.aws.com", "Mountpoint for Amazon S3 CSI driver"),
}


@dataclass
class PodStorage:
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    env_from: list[dict[str, Any]] = field(default_factory=list)
    claims: list[Manifest] = field(default_factory=list)
    mounted_by_kubernetes: set[str] = field(default_factory=set)  # mount paths berth boot must not mount again

    def add(self, name: str, source: dict[str, Any], mount_path: str, *, read_only: bool = False) -> None:
        self.volumes.append({"name": name, **source})
        mount: dict[str, Any] = {"name": name, "mountPath": mount_path}
        if read_only:
            mount["readOnly"] = True
        self.mounts.append(mount)


def pod_storage(spec: ServiceSpec, options: Options) -> PodStorage:
    out = PodStorage()
    _node_cache(spec, options, out)
    if any(entry.object_store is not None for entry in spec.storage):
        # Referenced, never rendered: berth does not hold the keys (OSS_ACCESS_KEY_ID, AWS_ACCESS_KEY_ID ...).
        out.env_from.append({"secretRef": {"name": options.storage_secret_for(object_name(spec.name))}})
    for index, entry in enumerate(spec.storage):
        _entry(spec, index, entry, options, out)
    return out


def _node_cache(spec: ServiceSpec, options: Options, out: PodStorage) -> None:
    *directories, fill_lock = cache.instance_paths(options.node_cache, spec.name)
    # The same paths inside as on the node, so one BERTH_CACHE_DIR fits both (as the agent does).
    for volume, path in zip(("cache-service", "cache-shared", "cache-pip", "cache-compile"), directories, strict=True):
        out.add(volume, {"hostPath": {"path": str(path), "type": "DirectoryOrCreate"}}, str(path))
    out.add("cache-fill-lock", {"hostPath": {"path": str(fill_lock), "type": "FileOrCreate"}}, str(fill_lock))
    out.env.append({"name": "BERTH_CACHE_DIR", "value": str(options.node_cache)})


def _entry(spec: ServiceSpec, index: int, entry: Storage, options: Options, out: PodStorage) -> None:
    name = f"storage-{index}"
    store = entry.object_store
    if store is not None:
        if store.effective_mode == "fuse":
            claim = f"{object_name(spec.name)}-storage-{index}"
            out.claims.append(_claim(spec, claim, entry, options))
            out.add(name, {"persistentVolumeClaim": {"claimName": claim, **({"readOnly": True} if store.read_only else {})}},
                    entry.mount_path, read_only=store.read_only)
            out.mounted_by_kubernetes.add(entry.mount_path)
        return  # cache mode: berth boot fills the node cache and links mount_path to it
    if entry.nfs is not None:
        nfs = {"server": entry.nfs.server, "path": entry.nfs.path, **({"readOnly": True} if entry.nfs.read_only else {})}
        out.add(name, {"nfs": nfs}, entry.mount_path, read_only=entry.nfs.read_only)
    elif entry.local is not None:
        out.add(name, {"hostPath": {"path": entry.local.path, "type": "Directory"}}, entry.mount_path,
                read_only=entry.local.read_only)  # read-only unless the spec says readOnly: false (issue 16)
    elif entry.empty_dir is not None:
        empty: dict[str, Any] = {}
        if entry.empty_dir.in_memory:
            empty["medium"] = "Memory"
        if entry.empty_dir.size_limit is not None:
            empty["sizeLimit"] = str(entry.empty_dir.size_limit)
        out.add(name, {"emptyDir": empty}, entry.mount_path)


def _claim(spec: ServiceSpec, claim: str, entry: Storage, options: Options) -> Manifest:
    store = entry.object_store
    assert store is not None
    access = "ReadOnlyMany" if store.read_only else "ReadWriteMany"
    obj = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(claim, options, object_name(spec.name)),
        "spec": {
            "accessModes": [access],
            "storageClassName": "",  # bind to the volume below, not to a provisioner
            "volumeName": claim,
            "resources": {"requests": {"storage": "1Gi"}},  # object stores have no size; the field is required
        },
    }
    driver, what = CSI_DRIVERS[entry.kind]
    csi: dict[str, Any] = {"driver": driver, "volumeHandle": claim}
    volume: dict[str, Any] = {
        "capacity": {"storage": "1Gi"}, "accessModes": [access], "persistentVolumeReclaimPolicy": "Retain",
        "claimRef": {"namespace": options.namespace, "name": claim}, "csi": csi,
    }
    if entry.kind == "oss":
        # The OSS plugin reads akId and akSecret from this Secret (its own key names, not berth's OSS_ACCESS_KEY_ID).
        csi["nodePublishSecretRef"] = {"name": f"{claim}-csi", "namespace": options.namespace}
        csi["volumeAttributes"] = {"bucket": store.bucket, "path": "/" + store.prefix,
                                   **({"url": store.endpoint} if store.endpoint else {})}
    else:
        # Mountpoint for S3 uses the driver's own credentials (IRSA or its aws-secret).
        csi["volumeAttributes"] = {"bucketName": store.bucket}
        if store.prefix:
            volume["mountOptions"] = [f"prefix {store.prefix}"]
        if store.read_only:
            volume["mountOptions"] = [*volume.get("mountOptions", []), "read-only"]
    note = (f"This claim expects a PersistentVolume of {what}, which berth does not render (it holds no "
            f"credentials); for {store.path}, e.g.:")
    commented = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": claim}, "spec": volume}
    return Manifest(obj, note, commented)
