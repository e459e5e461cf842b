{{/* Names, labels and the pieces the gateway and worker templates share. */}}

{{- define "aquila.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aquila.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway") */}}
{{- define "aquila.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "aquila.gateway" -}}{{ include "aquila.fullname" . }}-gateway{{- end -}}
{{- define "aquila.worker" -}}{{ include "aquila.fullname" . }}-worker{{- end -}}
{{/* The headless Service the gateway discovers workers through. */}}
{{- define "aquila.workerHeadless" -}}{{ include "aquila.fullname" . }}-worker-headless{{- end -}}
{{- define "aquila.discoverTarget" -}}
dns:///{{ include "aquila.workerHeadless" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.worker.ports.grpc }}
{{- end -}}

{{- define "aquila.serviceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aquila.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image; workers on cuda take the "-cuda" tag. (dict "ctx" $ "cuda" bool) */}}
{{- define "aquila.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag -}}
{{- if .cuda -}}{{- $tag = printf "%s-cuda" $tag -}}{{- end -}}
{{ .ctx.Values.image.repository }}:{{ $tag }}
{{- end -}}

{{- define "aquila.apiKeySecret" -}}
{{- default (printf "%s-api-keys" (include "aquila.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "aquila.apiKeysOn" -}}
{{- if or .Values.auth.apiKeys .Values.auth.existingSecret }}true{{ end -}}
{{- end -}}

{{/* Environment every Aquila container gets. */}}
{{- define "aquila.env" -}}
- name: AQUILA_LOG_JSON
  value: {{ .Values.logJson | quote }}
- name: HOME
  value: /tmp
{{- end -}}

{{/* gRPC probes on a health service (liveness or readiness), or TCP when
     the port speaks TLS (Kubernetes' gRPC probes cannot).
     (dict "port" N "service" "readiness" "tls" bool) */}}
{{- define "aquila.grpcProbe" -}}
{{- if .tls }}
tcpSocket:
  port: {{ .port }}
{{- else }}
grpc:
  port: {{ .port }}
  service: {{ .service }}
{{- end }}
{{- end -}}

{{- define "aquila.securityContext" -}}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
