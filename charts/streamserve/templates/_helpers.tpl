{{/* The chart's name, and the prefix of every object's name. The prefix always contains "streamserve" (the
     Services' names become Prometheus `job` labels, which StreamserveTargetDown matches on). */}}
{{- define "streamserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels of every object; call with (dict "root" $ "component" "worker"). */}}
{{- define "streamserve.labels" -}}
{{ include "streamserve.selectorLabels" . }}
app.kubernetes.io/part-of: streamserve
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "streamserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "streamserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The pipeline YAML the pods mount: values `pipeline` when set, else the chart's files/pipeline.yaml. */}}
{{- define "streamserve.pipelineText" -}}
{{- if .Values.pipeline }}{{ .Values.pipeline }}{{ else }}{{ .Files.Get "files/pipeline.yaml" }}{{ end }}
{{- end }}

{{/* The pipeline parsed, for the topic, group and ports the other objects must agree with. */}}
{{- define "streamserve.pipeline" -}}
{{- $pipeline := include "streamserve.pipelineText" . | fromYaml }}
{{- if hasKey $pipeline "Error" }}
{{- fail (printf "values pipeline: not valid YAML (%s)" $pipeline.Error) }}
{{- end }}
{{- range $path := list "input" "kafka" }}
{{- if not (hasKey $pipeline $path) }}
{{- fail (printf "values pipeline: the pipeline has no `%s` section" $path) }}
{{- end }}
{{- end }}
{{- toJson $pipeline }}
{{- end }}

{{- define "streamserve.observePort" -}}
{{- $pipeline := include "streamserve.pipeline" . | fromJson }}
{{- $observe := default dict $pipeline.observe }}
{{- required "the pipeline needs observe.port: the worker's probes and /metrics use it" $observe.port | int }}
{{- end }}

{{- define "streamserve.monitorPort" -}}
{{- $pipeline := include "streamserve.pipeline" . | fromJson }}
{{- $monitor := default dict $pipeline.monitor }}
{{- required "monitor.enabled needs monitor.port in the pipeline: its probes and /metrics use it" $monitor.port | int }}
{{- end }}

{{/* Pod-level security every pod of the chart shares: the image's non-root user. */}}
{{- define "streamserve.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "streamserve.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end }}

{{/* Environment every container shares: brokers, logging, extra variables. */}}
{{- define "streamserve.env" -}}
- name: STREAMSERVE_KAFKA__BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: STREAMSERVE_LOG_LEVEL
  value: {{ .Values.log.level | quote }}
- name: STREAMSERVE_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pipeline ConfigMap volume and its checksum (a changed pipeline rolls the pods). */}}
{{- define "streamserve.configVolume" -}}
- name: config
  configMap:
    name: {{ include "streamserve.fullname" . }}-pipeline
{{- end }}

{{- define "streamserve.configChecksum" -}}
checksum/pipeline: {{ include "streamserve.pipelineText" . | sha256sum }}
{{- end }}

{{/* One egress rule from a values entry {enabled, to, ports}; call with (dict "name" "kafka" "rule" $rule). */}}
{{- define "streamserve.egressRule" -}}
{{- if .rule.enabled -}}
- to:  # {{ .name }}
    {{- toYaml .rule.to | nindent 4 }}
  ports:
    {{- range .rule.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
    {{- if eq .name "dns" }}
    {{- range .rule.ports }}
    - {protocol: UDP, port: {{ . }}}
    {{- end }}
    {{- end }}
{{- end }}
{{- end }}
