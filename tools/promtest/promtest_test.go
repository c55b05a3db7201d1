package promtest

import "testing"

const body = `# TYPE jobs gauge
jobs{state="queued"} 1
jobs{state="running"} 2
# TYPE calls_total counter
calls_total{method="Get",code="OK"} 7
# TYPE plain untyped
plain 3
# TYPE latency_seconds histogram
latency_seconds_bucket{le="1"} 4
latency_seconds_bucket{le="+Inf"} 5
latency_seconds_sum 2.5
latency_seconds_count 5
`

func TestValue(t *testing.T) {
	mfs, err := Parse(body)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
		ok     bool
	}{
		{"jobs", []string{"state", "running"}, 2, true},
		{"jobs", nil, 1, true},
		{"jobs", []string{"state", "failed"}, 0, false},
		{"calls_total", []string{"method", "Get", "code", "OK"}, 7, true},
		{"calls_total", []string{"method", "Get", "code", "Unauthenticated"}, 0, false},
		{"plain", nil, 3, true},
		{"plain", []string{"state", ""}, 3, true},
		{"latency_seconds", nil, 5, true},
		{"missing", nil, 0, false},
	} {
		got, ok := Value(mfs, c.name, c.labels...)
		if got != c.want || ok != c.ok {
			t.Errorf("Value(%s, %v) = %v, %v; want %v, %v", c.name, c.labels, got, ok, c.want, c.ok)
		}
	}
}

func TestParseRejectsBadInput(t *testing.T) {
	if _, err := Parse("jobs{state=\"queued\" 1\n"); err == nil {
		t.Fatal("Parse accepted an unterminated label set")
	}
}
