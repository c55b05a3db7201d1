{{/*
Names. The prefix is at most 40 characters so that the longest derived
name, <prefix>-coordinator-headless, is a DNS label (63) and a StatefulSet
name leaves room for the controller's revision-hash label.
*/}}
{{- define "m2train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "m2train.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "m2train.coordinator.name" -}}
{{- include "m2train.fullname" . }}-coordinator
{{- end -}}

{{- define "m2train.coordinator.headless" -}}
{{- include "m2train.fullname" . }}-coordinator-headless
{{- end -}}

{{- define "m2train.worker.name" -}}
{{- include "m2train.fullname" . }}-worker
{{- end -}}

{{- define "m2train.worker.headless" -}}
{{- include "m2train.fullname" . }}-worker-headless
{{- end -}}

{{/* The namespace's service domain: <ns>.svc[.<clusterDomain>]. */}}
{{- define "m2train.svcDomain" -}}
{{- .Release.Namespace }}.svc{{ if .Values.clusterDomain }}.{{ .Values.clusterDomain }}{{ end }}
{{- end -}}

{{/* The client Service's API address, host:port. */}}
{{- define "m2train.coordinator.address" -}}
{{- include "m2train.coordinator.name" . }}.{{ include "m2train.svcDomain" . }}:{{ .Values.coordinator.ports.api }}
{{- end -}}

{{/*
The static raft peer list: id=host:raftport for every replica, the id being
the pod name (each replica's --id is $(POD_NAME)).
*/}}
{{- define "m2train.coordinator.peers" -}}
{{- $name := include "m2train.coordinator.name" . -}}
{{- $suffix := printf "%s.%s:%d" (include "m2train.coordinator.headless" .) (include "m2train.svcDomain" .) (int .Values.coordinator.ports.raft) -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.coordinator.replicas) -}}
{{- $peers = append $peers (printf "%s-%d=%s-%d.%s" $name $i $name $i $suffix) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{- define "m2train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "m2train.labels" -}}
helm.sh/chart: {{ include "m2train.chart" . }}
app.kubernetes.io/name: {{ include "m2train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: m2train
{{- end -}}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "coordinator"). */}}
{{- define "m2train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "m2train.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "m2train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "m2train.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference; call with (dict "image" .Values.image.worker "ctx" $). */}}
{{- define "m2train.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag -}}
{{- .image.repository }}:{{ $tag }}{{ if .image.digest }}@{{ .image.digest }}{{ end }}
{{- end -}}

{{/* The Secret holding the API token, or "" when the API takes no token. */}}
{{- define "m2train.authSecret" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if .Values.auth.generate -}}
{{- include "m2train.fullname" . }}-auth
{{- end -}}
{{- end -}}

{{/* Mount points of the Secrets in the containers. */}}
{{- define "m2train.authDir" -}}/etc/m2train/auth{{- end -}}
{{- define "m2train.tlsDir" -}}/etc/m2train/tls{{- end -}}

{{/* The --token-file and --tls-* flags, one list item per line. */}}
{{- define "m2train.securityArgs" -}}
{{- if include "m2train.authSecret" . }}
- --token-file={{ include "m2train.authDir" . }}/{{ .Values.auth.secretKey }}
{{- end }}
{{- if .Values.tls.enabled }}
- --tls-cert={{ include "m2train.tlsDir" . }}/tls.crt
- --tls-key={{ include "m2train.tlsDir" . }}/tls.key
- --tls-ca={{ include "m2train.tlsDir" . }}/ca.crt
{{- end }}
{{- end -}}

{{/* Volume mounts of the Secrets. */}}
{{- define "m2train.securityMounts" -}}
{{- if include "m2train.authSecret" . }}
- name: auth
  mountPath: {{ include "m2train.authDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "m2train.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes of the Secrets: readable by the pod's group (fsGroup) only. */}}
{{- define "m2train.securityVolumes" -}}
{{- $auth := include "m2train.authSecret" . -}}
{{- if $auth }}
- name: auth
  secret:
    secretName: {{ $auth }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.secretKey }}
        path: {{ .Values.auth.secretKey }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end -}}

{{- define "m2train.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
fsGroupChangePolicy: {{ .Values.podSecurityContext.fsGroupChangePolicy }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "m2train.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Checks that need arithmetic or several values, which the schema cannot
express. Rendered (to nothing) by every template that depends on them.
*/}}
{{- define "m2train.validate" -}}
{{- $c := .Values.coordinator.ports -}}
{{- $e := .Values.etcd.embedded -}}
{{- $ports := list (int $c.api) (int $c.raft) (int $c.metrics) -}}
{{- $what := printf "coordinator.ports (api %d, raft %d, metrics %d)" (int $c.api) (int $c.raft) (int $c.metrics) -}}
{{- if eq .Values.etcd.mode "embedded" -}}
{{- $ports = concat $ports (list (int $e.clientPort) (int $e.peerPort)) -}}
{{- $what = printf "%s and etcd.embedded (clientPort %d, peerPort %d)" $what (int $e.clientPort) (int $e.peerPort) -}}
{{- end -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail (printf "%s must all differ" $what) -}}
{{- end -}}
{{- $r := int .Values.coordinator.replicas -}}
{{- $pdb := .Values.coordinator.podDisruptionBudget -}}
{{- if and $pdb.enabled (gt (int $pdb.maxUnavailable) (max 1 (div (sub $r 1) 2))) -}}
{{- fail (printf "coordinator.podDisruptionBudget.maxUnavailable: %d of %d replicas would let a drain take the raft quorum; at most %d" (int $pdb.maxUnavailable) $r (max 1 (div (sub $r 1) 2))) -}}
{{- end -}}
{{- $n := int .Values.workers.gpusPerPod -}}
{{- $cp := int .Values.workers.collectivePort -}}
{{- $mp := int .Values.workers.metricsPort -}}
{{- if and (lt $cp (add $mp $n)) (lt $mp (add $cp $n)) -}}
{{- fail (printf "workers.collectivePort (%d..%d) and workers.metricsPort (%d..%d) overlap: worker i of a pod uses port+i for i < gpusPerPod (%d)" $cp (add $cp $n -1) $mp (add $mp $n -1) $n) -}}
{{- end -}}
{{- if gt (add $cp $n -1) 65535 -}}
{{- fail (printf "workers.collectivePort: %d + gpusPerPod (%d) - 1 exceeds 65535" $cp $n) -}}
{{- end -}}
{{- if gt (add $mp $n -1) 65535 -}}
{{- fail (printf "workers.metricsPort: %d + gpusPerPod (%d) - 1 exceeds 65535" $mp $n) -}}
{{- end -}}
{{- end -}}
