package dist

import (
	"github.com/m2train/m2train/collective"
	"github.com/m2train/m2train/model"
)

// bufferOf views s as a collective buffer of its own element type.
func bufferOf[T model.Float](s []T) collective.Buffer {
	switch v := any(s).(type) {
	case []float32:
		return collective.Float32s(v)
	case []float64:
		return collective.Float64s(v)
	}
	panic("dist: unsupported element type")
}

// putFloat64 rounds x into dst (len(dst) == len(x)); nil x writes zeros.
func putFloat64[T model.Float](dst []T, x []float64) {
	if x == nil {
		clear(dst)
		return
	}
	for i, v := range x {
		dst[i] = T(v)
	}
}
