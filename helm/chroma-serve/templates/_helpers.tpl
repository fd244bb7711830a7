{{/* Chart name, truncated to a DNS label. */}}
{{- define "chroma-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. Kept short: KubeRay derives RayCluster/pod/service names from it. */}}
{{- define "chroma-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chroma-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels (Helm conventions). */}}
{{- define "chroma-serve.labels" -}}
helm.sh/chart: {{ include "chroma-serve.chart" . }}
{{ include "chroma-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chroma-serve
{{- end }}

{{- define "chroma-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chroma-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The image `make image` builds: <appVersion> for the CPU image, <appVersion>-cuda for the GPU one. */}}
{{- define "chroma-serve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (eq .Values.image.device "cuda" | ternary "-cuda" "")) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* ---- Ray token auth ---- */}}
{{- define "chroma-serve.rayAuth.secretName" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "chroma-serve.fullname" .)) }}
{{- end }}

{{/* The release's Ray pods (head and every worker group), as a label selector. */}}
{{- define "chroma-serve.rayPodSelector" -}}
matchLabels:
  {{- include "chroma-serve.selectorLabels" . | nindent 2 }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values:
      - ray-head
      - ray-worker-{{ .Values.gpuWorkers.groupName }}
      - ray-worker-{{ .Values.cpuWorkers.groupName }}
{{- end }}

{{/* ---- checkpoint ---- */}}
{{- define "chroma-serve.checkpointPath" -}}
{{- required "checkpoint.path is required: the Chroma checkpoint directory inside the pods (e.g. /models/Chroma-4B)" .Values.checkpoint.path }}
{{- end }}

{{/* ---- Redis ---- */}}
{{- define "chroma-serve.redis.fullname" -}}
{{- printf "%s-redis" (include "chroma-serve.fullname" .) }}
{{- end }}

{{- define "chroma-serve.redis.secretName" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else }}
{{- include "chroma-serve.redis.fullname" . }}
{{- end }}
{{- end }}

{{/* Redis host:port of the chart's Redis. */}}
{{- define "chroma-serve.redis.hostPort" -}}
{{- printf "%s.%s.svc:6379" (include "chroma-serve.redis.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Redis URL without credentials (safe to put in the Serve config). */}}
{{- define "chroma-serve.redis.url" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s/%v" (include "chroma-serve.redis.hostPort" .) .Values.redis.db }}
{{- else }}
{{- $url := required "redis.externalUrl is required when redis.enabled is false (e.g. redis://redis.example:6379/0)" .Values.redis.externalUrl }}
{{- regexReplaceAll "^(rediss?://)[^@/]*@" $url "${1}" }}
{{- end }}
{{- end }}

{{/* "true" when the external Redis URL has no credentials and its password comes from externalPasswordSecret. */}}
{{- define "chroma-serve.redis.externalUrlNeedsPassword" -}}
{{- if and (not .Values.redis.enabled) (not (contains "@" .Values.redis.externalUrl)) .Values.redis.externalPasswordSecret.name }}true{{ end }}
{{- end }}

{{/* GCS fault-tolerance Redis address (host:port, or rediss://host:port for TLS). */}}
{{- define "chroma-serve.gcs.redisAddress" -}}
{{- if .Values.faultTolerance.redisAddress }}
{{- .Values.faultTolerance.redisAddress }}
{{- else if .Values.redis.enabled }}
{{- include "chroma-serve.redis.hostPort" . }}
{{- else }}
{{- $url := required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl }}
{{- $hostPort := regexReplaceAll "^rediss?://([^@/]*@)?([^/?]+).*$" $url "${2}" }}
{{- if hasPrefix "rediss://" $url }}{{ printf "rediss://%s" $hostPort }}{{ else }}{{ $hostPort }}{{ end }}
{{- end }}
{{- end }}

{{/* ---- API keys ---- */}}
{{- define "chroma-serve.apiKeys.secretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else }}
{{- printf "%s-api-keys" (include "chroma-serve.fullname" .) }}
{{- end }}
{{- end }}

{{/* ---- validation beyond the schema ---- */}}
{{- define "chroma-serve.validate" -}}
{{- $_ := include "chroma-serve.checkpointPath" . }}
{{- $_ := include "chroma-serve.redis.url" . }}
{{- range $key, $d := .Values.serve.deployments }}
{{- if $d.autoscaling }}
{{- if gt (float64 $d.autoscaling.minReplicas) (float64 $d.autoscaling.maxReplicas) }}
{{- fail (printf "serve.deployments.%s.autoscaling: minReplicas (%v) must not exceed maxReplicas (%v)" $key $d.autoscaling.minReplicas $d.autoscaling.maxReplicas) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $group := list "gpuWorkers" "cpuWorkers" }}
{{- $w := index $.Values $group }}
{{- if and $w.enabled (gt (float64 $w.minReplicas) (float64 $w.maxReplicas)) }}
{{- fail (printf "%s: minReplicas (%v) must not exceed maxReplicas (%v)" $group $w.minReplicas $w.maxReplicas) }}
{{- end }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not (contains "@" .Values.redis.externalUrl)) (not .Values.redis.externalPasswordSecret.name) }}
{{- fail "redis.externalUrl has no password and redis.externalPasswordSecret names none: voices and sessions live in Redis, so give one (redis://:PASSWORD@host:port/db, or externalPasswordSecret: {name, key})" }}
{{- end }}
{{- if and .Values.checkpoint.download.enabled .Values.checkpoint.hostPath (not .Values.checkpoint.existingClaim) }}
{{- fail "checkpoint.download and checkpoint.hostPath exclude each other: download into existingClaim or a per-pod emptyDir" }}
{{- end }}
{{- if and .Values.checkpoint.download.enabled (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.checkpoint.mountPath)) .Values.checkpoint.path)) }}
{{- fail (printf "checkpoint.download: checkpoint.path (%s) must lie under checkpoint.mountPath (%s), where the download volume is mounted" .Values.checkpoint.path .Values.checkpoint.mountPath) }}
{{- end }}
{{- if and (not .Values.gpuWorkers.enabled) (not .Values.cpuWorkers.enabled) (not .Values.head.schedulable) }}
{{- fail "no worker group is enabled and head.schedulable is false: nothing could host the Serve replicas" }}
{{- end }}
{{- end }}

{{/* Env shared by head and worker containers. */}}
{{- define "chroma-serve.env" -}}
{{- if .Values.redis.enabled }}
- name: CHROMA_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "chroma-serve.redis.secretName" . }}
      key: {{ .Values.redis.auth.passwordKey }}
- name: REDIS_URL
  value: {{ printf "redis://:$(CHROMA_REDIS_PASSWORD)@%s/%v" (include "chroma-serve.redis.hostPort" .) .Values.redis.db | quote }}
{{- else if include "chroma-serve.redis.externalUrlNeedsPassword" . }}
- name: CHROMA_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalPasswordSecret.name }}
      key: {{ .Values.redis.externalPasswordSecret.key | default "redis-password" }}
- name: REDIS_URL
  value: {{ regexReplaceAll "^(rediss?://)" .Values.redis.externalUrl "${1}:$(CHROMA_REDIS_PASSWORD)@" | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ .Values.redis.externalUrl | quote }}
{{- end }}
- name: CHROMA_REDIS_URL
  value: "$(REDIS_URL)"
- name: CHROMA_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "chroma-serve.apiKeys.secretName" . }}
      key: {{ .Values.apiKeys.secretKey }}
- name: CHROMA_CHECKPOINT
  value: {{ include "chroma-serve.checkpointPath" . | quote }}
{{- end }}

{{/* Volumes shared by head and worker pods; $ is the root context, .shm the /dev/shm size. */}}
{{- define "chroma-serve.volumes" -}}
{{- $ := .root }}
- name: api-keys
  secret:
    secretName: {{ include "chroma-serve.apiKeys.secretName" $ }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .shm }}
    sizeLimit: {{ . }}
    {{- end }}
{{- if $.Values.checkpoint.existingClaim }}
- name: checkpoint
  persistentVolumeClaim:
    claimName: {{ $.Values.checkpoint.existingClaim }}
    readOnly: {{ not $.Values.checkpoint.download.enabled }}
{{- else if $.Values.checkpoint.download.enabled }}
- name: checkpoint
  emptyDir:
    sizeLimit: {{ $.Values.checkpoint.download.sizeLimit }}
{{- else if $.Values.checkpoint.hostPath }}
- name: checkpoint
  hostPath:
    path: {{ $.Values.checkpoint.hostPath }}
    type: Directory
{{- end }}
{{- end }}

{{- define "chroma-serve.volumeMounts" -}}
- name: api-keys
  mountPath: {{ .Values.apiKeys.mountPath }}
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- if or .Values.checkpoint.existingClaim .Values.checkpoint.hostPath .Values.checkpoint.download.enabled }}
- name: checkpoint
  mountPath: {{ .Values.checkpoint.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The checkpoint download init container of a Ray pod (checkpoint.download). */}}
{{- define "chroma-serve.checkpointDownload" -}}
{{- $dl := .Values.checkpoint.download }}
- name: checkpoint-download
  image: {{ include "chroma-serve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["hf", "download", {{ $dl.repo | quote }}, "--revision", {{ $dl.revision | quote }}, "--local-dir", {{ include "chroma-serve.checkpointPath" . | quote }}]
  env:
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- with $dl.tokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .name }}
          key: {{ .key | default "HF_TOKEN" }}
    {{- end }}
  resources:
    {{- toYaml $dl.resources | nindent 4 }}
  {{- with .Values.containerSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: checkpoint
      mountPath: {{ .Values.checkpoint.mountPath }}
{{- end }}

{{/* Probes of a worker's Ray container: the app's health routes through the pod's Serve proxy. */}}
{{- define "chroma-serve.workerProbes" -}}
{{- range $kind := list "startup" "readiness" "liveness" }}
{{- $p := index $.Values.probes $kind }}
{{ $kind }}Probe:
  httpGet:
    path: {{ $p.path }}
    port: {{ $.Values.serve.port }}
  {{- toYaml (omit $p "path") | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod metadata for Ray pods; .root is the root context, .component the node role. */}}
{{- define "chroma-serve.rayPodMetadata" -}}
{{- $ := .root }}
labels:
  {{- include "chroma-serve.selectorLabels" $ | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with $.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
