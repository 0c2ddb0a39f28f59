{{/* Names and labels. */}}
{{- define "streamlstm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "streamlstm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "streamlstm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamlstm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "streamlstm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "streamlstm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "streamlstm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "streamlstm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: above the daemon's shutdown timeout, always. */}}
{{- define "streamlstm.gracePeriod" -}}
{{- $timeout := int (ceil .Values.shutdownTimeoutSeconds) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $timeout 15 -}}
{{- else -}}
{{- $grace := int .Values.terminationGracePeriodSeconds -}}
{{- if le $grace $timeout -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed shutdownTimeoutSeconds (%d)" $grace $timeout) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}
{{- end -}}

{{/* The serve settings as TOML: `key = value`, one a line; empty strings are left out. */}}
{{- define "streamlstm.settings" -}}
{{- $k := .Values.kafka -}}
{{- $s := dict
  "model" .Values.model.path
  "bootstrap_servers" $k.bootstrapServers
  "input_topic" $k.inputTopic
  "output_topic" $k.outputTopic
  "dlq_topic" $k.dlqTopic
  "metrics_topic" $k.metricsTopic
  "group_id" $k.groupId
  "metrics_port" .Values.metrics.port
  "shutdown_timeout_s" .Values.shutdownTimeoutSeconds
  "security_protocol" $k.securityProtocol
  "sasl_mechanism" $k.saslMechanism
-}}
{{- if $k.ssl.existingSecret -}}
{{- $_ := set $s "ssl_cafile" (printf "/etc/streamlstm/tls/%s" $k.ssl.caKey) -}}
{{- if $k.ssl.certKey -}}
{{- $_ := set $s "ssl_certfile" (printf "/etc/streamlstm/tls/%s" $k.ssl.certKey) -}}
{{- $_ := set $s "ssl_keyfile" (printf "/etc/streamlstm/tls/%s" $k.ssl.keyKey) -}}
{{- end -}}
{{- end -}}
{{- if .Values.stateDir.enabled -}}
{{- $_ := set $s "state_dir" .Values.stateDir.mountPath -}}
{{- end -}}
{{- if .Values.admin.enabled -}}
{{- if eq (int .Values.admin.port) (int .Values.metrics.port) -}}
{{- fail (printf "admin.port (%d) must differ from metrics.port" (int .Values.admin.port)) -}}
{{- end -}}
{{- $_ := set $s "admin_port" .Values.admin.port -}}
{{- $_ := set $s "admin_token_file" (include "streamlstm.adminTokenFile" .) -}}
{{- end -}}
{{- range $key, $value := .Values.config -}}
{{- if has $key (list "sasl_plain_password" "instance_id" "group_instance_id") -}}
{{- fail (printf "config.%s: not allowed here (secrets and per-pod settings come from the chart)" $key) -}}
{{- end -}}
{{- /* The admin API's port, token and Service go together: admin.* sets them all. */ -}}
{{- if hasPrefix "admin_" $key -}}
{{- fail (printf "config.%s: not allowed here (the admin API is set by admin.*)" $key) -}}
{{- end -}}
{{- $_ := set $s $key $value -}}
{{- end -}}
{{- range $key := keys $s | sortAlpha -}}
{{- $value := get $s $key -}}
{{- if or (kindIs "bool" $value) (kindIs "float64" $value) (kindIs "int" $value) (kindIs "int64" $value) $value }}
{{ $key }} = {{ toJson $value }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The stream admin API's Service and chart-made Secret: within a Service name's 63. */}}
{{- define "streamlstm.adminName" -}}
{{- printf "%s-admin" (include "streamlstm.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}

{{/* Where the admin token's Secret is mounted: the daemon's admin_token_file. */}}
{{- define "streamlstm.adminTokenFile" -}}
/etc/streamlstm/admin/token
{{- end -}}

{{/* The Secret holding the admin token: an existing one, or the chart's own made from
admin.token.value. Every admin template names it through here, so admin.enabled
without either fails rendering with one message. */}}
{{- define "streamlstm.adminTokenSecret" -}}
{{- $t := .Values.admin.token -}}
{{- if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else if trim $t.value -}}
{{- include "streamlstm.adminName" . -}}
{{- else -}}
{{- fail "admin.enabled needs a token: admin.token.existingSecret (a Secret holding it under admin.token.existingSecretKey) or admin.token.value" -}}
{{- end -}}
{{- end -}}

{{/* The token's key in that Secret (the chart's own Secret uses `token`). */}}
{{- define "streamlstm.adminTokenKey" -}}
{{- if .Values.admin.token.existingSecret -}}
{{- .Values.admin.token.existingSecretKey -}}
{{- else -}}
token
{{- end -}}
{{- end -}}
