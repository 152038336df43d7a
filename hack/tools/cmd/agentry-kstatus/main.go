// Command agentry-kstatus reads one Kubernetes object (JSON or YAML) on stdin and prints how
// sigs.k8s.io/cli-utils kstatus reads its health, as one JSON line:
//
//	{"status":"InProgress","message":"..."}
//
// status is one of InProgress, Failed, Current, Terminating, NotFound, Unknown. The exit code is 0
// whenever a status was computed (whatever it is) and 1 when the input cannot be read.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type output struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: agentry-kstatus < object.{json,yaml}")
		os.Exit(2)
	}
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "agentry-kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	raw, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("reading stdin: %w", err)
	}
	// JSON is YAML, so one path reads both.
	js, err := yaml.YAMLToJSON(raw)
	if err != nil {
		return fmt.Errorf("decoding the object: %w", err)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		return fmt.Errorf("decoding the object: %w", err)
	}
	res, err := status.Compute(u)
	if err != nil {
		return fmt.Errorf("computing the status: %w", err)
	}
	line, err := json.Marshal(output{Status: res.Status.String(), Message: res.Message})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(out, "%s\n", line)
	return err
}
