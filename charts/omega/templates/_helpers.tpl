{{- define "omega.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; fullnameOverride replaces it, nameOverride replaces the chart name in it. */}}
{{- define "omega.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "omega.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "omega.operatorName" -}}
{{- printf "%s-operator" (include "omega.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "omega.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "omega.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Selector labels. app.kubernetes.io/name=omega-operator is what the shards' NetworkPolicies
admit, so name overrides change object names, never this label. */}}
{{- define "omega.selectorLabels" -}}
app.kubernetes.io/name: omega-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "omega.labels" -}}
{{ include "omega.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: omega
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}
