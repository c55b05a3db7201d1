package collective_test

import (
	"errors"
	"strings"
)

func errorIs(err, target error) bool { return errors.Is(err, target) }

func contains(s, sub string) bool { return strings.Contains(s, sub) }
